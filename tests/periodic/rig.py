"""Helpers of the periodic tests: schedulers stepped by hand on a memory broker, a fake clock."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field

from ebsqs.brokers import QueueSettings
from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings
from ebsqs.envelope import decode
from ebsqs.periodic import PeriodicRegistry, periodic
from ebsqs.periodic.registry import Missed
from ebsqs.periodic.scheduler import Scheduler
from ebsqs.periodic.store import Store
from ebsqs.registry import TaskRegistry
from ebsqs.supervisor.config import QueueSpec, SupervisorConfig
from ebsqs.task import task


@dataclass
class Clock:
    """Wall-clock seconds that move only when told."""

    now: float

    def __call__(self) -> float:
        return self.now

    def at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.now, dt.UTC)


@dataclass
class Fleet:
    """A memory broker, one queue, one periodic task every second, and its schedulers."""

    queue: str
    missed: Missed = "skip"
    url: str = field(default_factory=lambda: f"memory://periodic-{uuid.uuid4().hex[:8]}")
    registry: PeriodicRegistry = field(default_factory=PeriodicRegistry)

    def __post_init__(self) -> None:
        self.broker = MemoryBroker.from_url(self.url)
        self.broker.ensure_queue(self.queue, QueueSettings(fifo=self.queue.endswith(".fifo")))
        # Queues are not created on a send: a test deletes the queue to make sends fail.
        self.settings = Settings(
            broker_url=self.url, default_queue=self.queue, auto_create_queues=False
        )

        @periodic(every=dt.timedelta(seconds=1), missed=self.missed, registry=self.registry)
        @task(name="fleet.tick", registry=TaskRegistry())
        def tick(scheduled_at: str) -> None: ...

        self.task = tick

    def config(self) -> SupervisorConfig:
        return SupervisorConfig(apps=(), queues=(QueueSpec(self.queue, 1),), settings=self.settings)

    def scheduler(self, store: Store, clock: Clock) -> Scheduler:
        return Scheduler(self.config(), self.registry, store, clock)

    def sent(self) -> list[str]:
        """The ``scheduled_at`` of every message in the queue, in arrival order (deleted: a FIFO
        group hands out its next message only once the one before is gone)."""
        found = []
        while batch := self.broker.receive(self.queue, 10, wait_seconds=0, visibility_timeout=600):
            found += [str(decode(message.body).kwargs["scheduled_at"]) for message in batch]
            self.broker.ack(batch)
        return found


def iso_seconds(start: float, count: int) -> list[str]:
    """``count`` whole seconds from ``start`` as the ticks' ISO names."""
    return [
        dt.datetime.fromtimestamp(start + i, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for i in range(count)
    ]

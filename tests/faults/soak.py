"""The soak: a supervisor on fauxqs, SIGKILLed at random while a producer sends (``make soak``).

::

    python -m tests.faults.soak --messages 10000 --duration 300

A producer spreads ``--messages`` no-op tasks over most of ``--duration``, in bursts of
``--burst``; meanwhile a random
child is SIGKILLed every ``--kill-every`` seconds (on average), and every ``--master-every``-th
kill hits the master instead, after which its orphaned children drain and a new supervisor is
started. When everything was sent, the kills stop and the queue settles. It prints:

- messages, kills (children and masters);
- lost: sent keys never finished and not dead-lettered (goal 0);
- duplicates per kill: finishes beyond the first, over kills (goal <= 1);
- the master's resident memory and open descriptors, first and last sample of its longest
  life, and their drift (goal +-10 %).

It exits 0 when every goal is met, 1 otherwise, 2 when fauxqs is not installed. The evidence
is the ledger and the dead-letter queue, as in the fault tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from ebsqs.brokers.sqs import SQSBroker
from tests import servers
from tests.faults.harness import NOOP, EbsqsProcess, Rig
from tests.faults.ledger import Ledger
from tests.faults.proxy import ChaosProxy
from tests.waiting import wait_until

#: Seconds a master runs before its first memory sample: imports and forks are done by then.
WARM_UP = 3.0
#: Samples (0.1 s apart) whose median is the first or the last reading.
WINDOW = 20


@dataclass
class MasterLife:
    """Resource samples of one master process, from after its warm-up to its end."""

    process: EbsqsProcess
    started: float = field(default_factory=time.monotonic)
    samples: list[tuple[int, int]] = field(default_factory=list)

    def sample(self) -> None:
        """Record (RSS bytes, open fds) now, if the master is past its warm-up and alive."""
        if time.monotonic() - self.started < WARM_UP:
            return
        try:
            proc = psutil.Process(self.process.pid)
            self.samples.append((proc.memory_info().rss, proc.num_fds()))
        except psutil.Error:
            return

    @property
    def first(self) -> tuple[int, int] | None:
        """The median of the first samples: one sample may catch a fork half done."""
        return _median(self.samples[:WINDOW])

    @property
    def last(self) -> tuple[int, int] | None:
        return _median(self.samples[-WINDOW:])

    def span(self) -> float:
        return time.monotonic() - self.started


def _median(samples: list[tuple[int, int]]) -> tuple[int, int] | None:
    if not samples:
        return None
    return (
        int(statistics.median(rss for rss, _ in samples)),
        int(statistics.median(fds for _, fds in samples)),
    )


@dataclass
class Report:
    messages: int
    child_kills: int
    master_kills: int
    lost: int
    duplicates: int
    dead_lettered: int
    life: MasterLife | None

    @property
    def kills(self) -> int:
        return self.child_kills + self.master_kills

    def drift(self, index: int) -> float:
        if self.life is None or self.life.first is None or self.life.last is None:
            return 0.0
        return (self.life.last[index] - self.life.first[index]) / self.life.first[index]

    def ok(self) -> bool:
        per_kill = self.duplicates / max(self.kills, 1)
        return self.lost == 0 and per_kill <= 1 and all(abs(self.drift(i)) <= 0.10 for i in (0, 1))

    def lines(self) -> list[str]:
        life = self.life
        first = life.first if life and life.first else (0, 0)
        last = life.last if life and life.last else (0, 0)
        span = life.span() if life else 0.0
        return [
            f"messages:            {self.messages}",
            f"kills:               {self.kills} ({self.child_kills} children, "
            f"{self.master_kills} masters)",
            f"lost:                {self.lost}  (goal 0)",
            f"dead-lettered:       {self.dead_lettered}",
            f"duplicates:          {self.duplicates}",
            f"duplicates per kill: {self.duplicates / max(self.kills, 1):.2f}  (goal <= 1)",
            f"master RSS:          {first[0] / 2**20:.1f} -> {last[0] / 2**20:.1f} MiB "
            f"({self.drift(0):+.1%}, goal +-10 %) over {span:.0f} s",
            f"master fds:          {first[1]} -> {last[1]} ({self.drift(1):+.1%}, goal +-10 %)",
            f"result:              {'ok' if self.ok() else 'FAILED'}",
        ]


class Soak:
    """One soak run on a :class:`~tests.faults.harness.Rig` (the proxy adds no faults)."""

    def __init__(self, rig: Rig, options: argparse.Namespace) -> None:
        self.rig = rig
        self.options = options
        self.random = random.Random(options.seed)
        self.lives: list[MasterLife] = []
        self.child_kills = 0
        self.master_kills = 0
        self.sent_all = threading.Event()

    def supervise(self) -> MasterLife:
        """Start a supervisor and wait until its children run."""
        process = self.rig.start(
            "supervise",
            "--workers",
            str(self.options.workers),
            "--visibility-timeout",
            str(self.options.visibility_timeout),
            "--log-level",
            "warning",
        )
        wait_until(lambda: len(process.children()) == self.options.workers, 30)
        life = MasterLife(process)
        self.lives.append(life)
        return life

    def produce(self) -> None:
        """Send every message in bursts of ``--burst``, spread over 80 % of the duration.

        Bursts, not a trickle: kills then land while children hold full batches, which is
        where a crash can repeat finished work.
        """
        burst = max(self.options.burst, 1)
        bursts = (self.options.messages + burst - 1) // burst
        pause = self.options.duration * 0.8 / max(bursts, 1)
        for number in range(bursts):
            first = number * burst
            count = min(burst, self.options.messages - first)
            self.rig.send([f"s{first + i:06}" for i in range(count)], task=NOOP)
            time.sleep(pause)  # pacing the producer, not waiting for anything
        self.sent_all.set()

    def kill_one(self, life: MasterLife) -> MasterLife:
        """SIGKILL a random child, or (every ``--master-every``-th kill) the master."""
        kills = self.child_kills + self.master_kills + 1
        if self.options.master_every and kills % self.options.master_every == 0:
            orphans = set(life.process.children())
            life.process.signal(signal.SIGKILL)
            self.master_kills += 1
            wait_until(lambda: not set(life.process.group()) & orphans, 60)
            return self.supervise()
        children = life.process.children()
        if children:
            os.kill(self.random.choice(children), signal.SIGKILL)
            self.child_kills += 1
        return life

    def run(self) -> Report:
        life = self.supervise()
        producer = threading.Thread(target=self.produce, name="soak-producer", daemon=True)
        producer.start()
        deadline = time.monotonic() + self.options.duration
        next_kill = time.monotonic() + self._interval()
        while not self.sent_all.is_set() and time.monotonic() < deadline:
            life.sample()
            if time.monotonic() >= next_kill:
                life = self.kill_one(life)
                next_kill = time.monotonic() + self._interval()
            time.sleep(0.1)  # the soak's sampling period
        producer.join()
        self._settle(life)
        life.process.signal(signal.SIGTERM)
        life.process.wait(60)
        return self._report()

    def _interval(self) -> float:
        return float(self.options.kill_every) * self.random.uniform(0.5, 1.5)

    def _settle(self, life: MasterLife) -> None:
        """Wait for every message to finish or be dead-lettered, sampling the master."""
        deadline = time.monotonic() + 60 + 2 * self.options.visibility_timeout
        while self.rig.lost() and time.monotonic() < deadline:
            life.sample()
            time.sleep(0.5)
        life.sample()

    def _report(self) -> Report:
        ledger = self.rig.ledger
        longest = max(self.lives, key=lambda one: one.span(), default=None)
        return Report(
            messages=len(self.rig.sent),
            child_kills=self.child_kills,
            master_kills=self.master_kills,
            lost=len(self.rig.lost()),
            duplicates=ledger.extra_runs(),
            dead_lettered=len(self.rig.dead_letters.keys()),
            life=longest,
        )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument("--messages", type=int, default=10000, help="tasks to send (10000)")
    parser.add_argument("--duration", type=float, default=300, help="seconds of kills (300)")
    parser.add_argument("--workers", type=int, default=4, help="children (4)")
    parser.add_argument("--burst", type=int, default=200, help="messages per send burst (200)")
    parser.add_argument("--kill-every", type=float, default=3.0, help="mean seconds per kill")
    parser.add_argument(
        "--master-every", type=int, default=5, help="every Nth kill hits the master (0: never)"
    )
    parser.add_argument("--visibility-timeout", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    # An entry point: this process's own ebsqs lines (client created...) are noise here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if not servers.fauxqs_installed():
        print("fauxqs is not installed: run `make tools` (needs npm)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ebsqs-soak-") as tmp, servers.fauxqs_server() as url:
        os.environ.update(servers.sqs_env_vars(url))
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            os.environ.pop(name, None)
        rig = Rig(
            broker=SQSBroker(),
            proxy=ChaosProxy(url, lifetime=options.duration + 600),
            queue=servers.unique_queue_name("soak"),
            tmp_path=Path(tmp),
            ledger=Ledger(Path(tmp) / "ledger.txt"),
        )
        try:
            rig.create(visibility=options.visibility_timeout)
            report = Soak(rig, options).run()
        finally:
            rig.close()
            rig.proxy.close()
            rig.broker.close()
    print("\n".join(report.lines()))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())

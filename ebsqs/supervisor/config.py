"""What the supervisor is told: queues and their child counts, limits and timeouts.

Everything here is plain data, built in the master before any fork and read on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ebsqs.backoff import Backoff
from ebsqs.config import DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, Settings
from ebsqs.errors import ConfigurationError
from ebsqs.log import LogFormat

#: Children per queue when neither ``--workers`` nor ``queue:N`` says: two, so one child can be
#: replaced (HUP, recycling, a crash) while the other keeps the queue moving, and the default
#: stays cheap on a small machine. Size it to the work: CPU-bound tasks want about one child per
#: core across all queues, I/O-bound ones more.
DEFAULT_WORKERS = 2
__all__ = [
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_WORKERS",
    "QueueSpec",
    "SupervisorConfig",
    "parse_queues",
]


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One logical queue and how many children consume it."""

    name: str
    workers: int


def parse_queues(text: str, default_workers: int = DEFAULT_WORKERS) -> tuple[QueueSpec, ...]:
    """Parse ``"a,b"`` or ``"a:8,b:2"`` (mixing allowed) into queue specs.

    Args:
        text: comma-separated queue names, each optionally followed by ``:count``.
        default_workers: the count of queues that name none.

    Raises:
        ConfigurationError: an empty list, a repeated queue, or a count that is not a positive
            integer.
    """
    specs: list[QueueSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, count = (piece.strip() for piece in item.partition(":"))
        workers = _positive(count, item) if count else default_workers
        if not name:
            raise ConfigurationError(f"queue entry {item!r} has no name")
        if any(spec.name == name for spec in specs):
            raise ConfigurationError(f"queue {name!r} is listed twice")
        specs.append(QueueSpec(name, workers))
    if not specs:
        raise ConfigurationError("name at least one queue")
    return tuple(specs)


def _positive(count: str, item: str) -> int:
    try:
        value = int(count)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigurationError(
            f"queue entry {item!r}: the child count must be a positive integer"
        )
    return value


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """How ``ebsqs supervise`` runs. Built once in the master; children read it after the fork.

    Attributes:
        apps: task modules the master imports once before forking.
        queues: the queues and their child counts.
        settings: broker URL, wait, visibility timeout and the rest (see :class:`Settings`).
        executor: executor name of every child (``inline``, ``thread``, ``process``...).
        concurrency: tasks each child's executor runs at once.
        graceful_timeout: seconds a draining child may finish running tasks before SIGKILL.
        heartbeat_timeout: seconds of heartbeat silence after which a child counts as hung.
        max_tasks_per_child: recycle a child after about this many tasks (plus or minus
            :attr:`max_tasks_jitter`), or None.
        max_memory_per_child: recycle a child whose RSS exceeds this many MiB, or None.
        pidfile: where the master writes its pid, or None.
        log_format: passed to :func:`ebsqs.log.configure` again in each child.
        log_level: likewise.
        max_tasks_jitter: the fraction by which each child's task limit is spread.
        murder_grace: seconds between SIGABRT and SIGKILL for a hung child.
        deadline_grace: seconds a child may run past its task's hard limit before it is killed.
        restart_backoff: delays between repeated crashes of one slot (no jitter: 0.1 s doubling
            up to 30 s); the first crash is replaced at once.
        stable_after: seconds a child must stay up for its slot's crash count to reset.
        fast_stop_timeout: seconds children get to release their messages on a fast stop.
        boot_crash_limit: children in a row that crash before consuming, in every slot of a
            queue, after which the master stops with ``ExitCode.BOOT`` instead of restarting.
        poll_token_dir: where the children keep their poll tokens (see :mod:`ebsqs.worker.idle`),
            so only one idle child per queue long-polls; None lets every child poll.
    """

    apps: tuple[str, ...]
    queues: tuple[QueueSpec, ...]
    settings: Settings = field(default_factory=Settings)
    executor: str = "inline"
    concurrency: int = 1
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    pidfile: str | None = None
    log_format: LogFormat = "auto"
    log_level: str = "info"
    max_tasks_jitter: float = 0.1
    murder_grace: float = 1.0
    deadline_grace: float = 3.0
    restart_backoff: Backoff = field(default_factory=lambda: Backoff(0.1, 30.0, jitter=False))
    stable_after: float = 30.0
    fast_stop_timeout: float = 5.0
    boot_crash_limit: int = 5
    poll_token_dir: str | None = None

    @property
    def max_memory_bytes(self) -> int | None:
        """:attr:`max_memory_per_child` in bytes."""
        return None if self.max_memory_per_child is None else self.max_memory_per_child << 20

"""``ebsqs supervise`` end to end: real masters and children, real signals, fauxqs.

Each test starts ``ebsqs supervise`` in its own session (so cleanup can kill the whole process
group), with ``tests/fixtures`` on ``PYTHONPATH`` for the ``sup_*`` task modules. Tasks append
``start`` / ``done`` lines to a record file, from which the tests count how often each message
ran, in which child and from which queue; psutil shows the children and their titles. Several
children consume one queue at once, so these run on fauxqs (moto's server can hand two concurrent
receivers the same message: a duplicate there would be the server's, not ebsqs's).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from ebsqs.brokers import OutgoingMessage, QueueSettings
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.envelope import Envelope, decode, encode
from tests.servers import subprocess_env
from tests.waiting import wait_until

pytestmark = pytest.mark.fauxqs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TITLE = re.compile(r"ebsqs: worker\[(?P<queue>[^\]]+)\] #(?P<slot>\d+) (?P<state>\w+)")


# -- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One line of the record file."""

    event: str
    pid: int
    queue: str
    key: str
    task_id: str
    attempt: int
    at: float
    extra: str


class Supervisor:
    """An ``ebsqs supervise`` process and what it wrote."""

    def __init__(self, tmp_path: Path, endpoint: str, args: list[str], env: dict[str, str]) -> None:
        self.log_path = tmp_path / "supervise.log"
        self.record_path = tmp_path / "record.txt"
        self.record_path.touch()
        python_path = os.pathsep.join(
            [str(tmp_path), str(FIXTURES), os.environ.get("PYTHONPATH", "")]
        )
        full_env = subprocess_env(
            endpoint,
            SUP_RECORD=str(self.record_path),
            PYTHONPATH=python_path,
            PYTHONDONTWRITEBYTECODE="1",
            EBSQS_LOG_FORMAT="json",
            **env,
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ebsqs", "supervise", *args],
                env=full_env,
                cwd=tmp_path,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.pid = self.process.pid

    # -- processes --

    def children(self) -> dict[int, tuple[str, int, str]]:
        """``{pid: (queue, slot, state)}`` of the master's worker children, from their titles."""
        found = {}
        try:
            processes = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return {}
        for child in processes:
            try:
                match = TITLE.search(" ".join(child.cmdline()))
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            if match:
                found[child.pid] = (match["queue"], int(match["slot"]), match["state"])
        return found

    def consuming(self) -> dict[str, set[int]]:
        """Pids of children that are idle or busy, by queue."""
        result: dict[str, set[int]] = {}
        for pid, (queue, _, state) in self.children().items():
            if state in ("idle", "busy"):
                result.setdefault(queue, set()).add(pid)
        return result

    def wait_consuming(self, counts: dict[str, int], timeout: float = 15) -> dict[str, set[int]]:
        """Wait until exactly ``counts`` children per queue are consuming (and no others)."""

        def matches() -> dict[str, set[int]] | None:
            now = self.consuming()
            if {q: len(p) for q, p in now.items()} == counts and len(self.children()) == sum(
                counts.values()
            ):
                return now
            return None

        return wait_until(
            matches, timeout, interval=0.05, message=lambda: f"children: {self.children()}"
        )

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill_all(self) -> None:
        """Cleanup: kill the master's whole process group, whatever state it is in."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    # -- what it wrote --

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (of one event name)."""
        found = []
        for line in self.log_path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if name is None or entry.get("event") == name:
                found.append(entry)
        return found

    def log_text(self) -> str:
        return self.log_path.read_text()

    def runs(self, event: str = "done") -> list[Run]:
        rows = []
        for line in self.record_path.read_text().splitlines():
            parts = line.split(" ", 7)
            parts += [""] * (8 - len(parts))
            if parts[0] == event:
                rows.append(
                    Run(
                        parts[0],
                        int(parts[1]),
                        parts[2],
                        parts[3],
                        parts[4],
                        int(parts[5]),
                        float(parts[6]),
                        parts[7],
                    )
                )
        return rows

    def done_keys(self) -> Counter[str]:
        return Counter(run.key for run in self.runs("done"))


@pytest.fixture
def supervise(tmp_path: Path, fauxqs_server: str) -> Iterator[Any]:
    """``supervise(*args, **env)`` starts ``ebsqs supervise``; all are killed at the end."""
    started: list[Supervisor] = []

    def start(*args: str, **env: str) -> Supervisor:
        sup = Supervisor(tmp_path, fauxqs_server, list(args), env)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.kill_all()


@pytest.fixture
def broker(sqs_env: str) -> Iterator[SQSBroker]:
    """A broker of the test's own, on fauxqs (``sqs_env`` is parametrized to it below)."""
    the_broker = SQSBroker()
    yield the_broker
    the_broker.close()


def fauxqs_env() -> Any:
    return pytest.mark.parametrize("sqs_env", ["fauxqs"], indirect=True)


def create_queue(broker: SQSBroker, name: str, visibility: int = 30) -> str:
    broker.ensure_queue(
        name,
        QueueSettings(
            visibility_timeout=visibility, dead_letter_queue=f"{name}-dlq", max_receive_count=10
        ),
    )
    return name


def send(
    broker: SQSBroker, queue: str, keys: Iterable[str], task: str = "sup_tasks.work", **kwargs: Any
) -> list[str]:
    """Send one task message per key (``task(key, **kwargs)``); return the keys."""
    keys = list(keys)
    bodies = [encode(Envelope(task=task, args=(key,), kwargs=kwargs)) for key in keys]
    for start in range(0, len(bodies), 10):
        broker.send_batch(queue, [OutgoingMessage(body) for body in bodies[start : start + 10]])
    return keys


def drain_queue(broker: SQSBroker, queue: str) -> list[str]:
    """Receive and delete everything left in ``queue``; return the keys of those messages."""
    keys: list[str] = []
    while True:
        batch = broker.receive(queue, 10, wait_seconds=1, visibility_timeout=30)
        if not batch:
            return keys
        keys += [str(decode(message.body).args[0]) for message in batch]
        broker.ack(batch)


def queue_empty(broker: SQSBroker, queue: str) -> bool:
    stats = broker.stats(queue)
    return stats.visible == 0 and stats.in_flight == 0 and stats.delayed == 0


# -- 1. children per queue -----------------------------------------------------------------------


@fauxqs_env()
@pytest.mark.timeout(60)
def test_each_queue_gets_its_children(
    supervise: Any, broker: SQSBroker, unique_queue: Any, tmp_path: Path
) -> None:
    a, b = create_queue(broker, unique_queue()), create_queue(broker, unique_queue())
    pidfile = tmp_path / "master.pid"
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{a},{b}", "--workers", "3", "--wait", "1",
        "--pidfile", str(pidfile),
    )  # fmt: skip
    children = sup.wait_consuming({a: 3, b: 3})
    assert pidfile.read_text().strip() == str(sup.pid)
    slots = {
        queue: sorted(slot for q, slot, _ in sup.children().values() if q == queue)
        for queue in (a, b)
    }
    assert slots == {a: [1, 2, 3], b: [1, 2, 3]}

    keys_a = send(broker, a, (f"a{i}" for i in range(30)), seconds=0.05)
    keys_b = send(broker, b, (f"b{i}" for i in range(30)), seconds=0.05)
    wait_until(lambda: len(sup.runs()) == 60, 20, message=lambda: f"{len(sup.runs())} ran")

    runs = sup.runs()
    assert sup.done_keys() == Counter(keys_a + keys_b)
    assert {run.pid for run in runs if run.key in keys_a} <= children[a]
    assert {run.pid for run in runs if run.key in keys_b} <= children[b]
    assert {run.queue for run in runs if run.key in keys_a} == {a}
    assert {run.queue for run in runs if run.key in keys_b} == {b}
    # Nobody was restarted along the way.
    assert sup.consuming() == children

    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0
    assert not pidfile.exists()


# -- 2. a child killed in the middle of a task ---------------------------------------------------


@fauxqs_env()
@pytest.mark.timeout(60)
def test_killed_child_is_replaced_and_its_message_runs_again(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{queue}:2", "--wait", "1", "--visibility-timeout", "3"
    )
    before = sup.wait_consuming({queue: 2})[queue]
    keys = send(broker, queue, ["slow"], seconds=1.5)
    keys += send(broker, queue, (f"k{i}" for i in range(20)), seconds=0.02)
    victim = wait_until(lambda: [r.pid for r in sup.runs("start") if r.key == "slow"], 15)[0]

    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    replaced = wait_until(
        lambda: len(sup.consuming().get(queue, ())) == 2 and victim not in sup.consuming()[queue],
        2.0,
        interval=0.02,
        message=lambda: f"children: {sup.children()}",
    )
    assert replaced and time.monotonic() - killed_at < 2.0

    wait_until(
        lambda: sup.done_keys() == Counter(keys), 20, message=lambda: f"done: {sup.done_keys()}"
    )
    slow_starts = [r for r in sup.runs("start") if r.key == "slow"]
    assert slow_starts[0].pid == victim
    assert len(slow_starts) == 2 and slow_starts[1].pid != victim
    assert slow_starts[1].at - slow_starts[0].at >= 2.5  # back only after its visibility timeout
    wait_until(lambda: queue_empty(broker, queue), 10, message="the queue did not empty")
    [exited] = [e for e in sup.events("child_exited") if e["pid"] == victim]
    assert exited["signal"] == "SIGKILL" and exited["verdict"] == "crashed"
    assert before - {victim} <= sup.consuming()[queue]


# -- 3. a frozen child -------------------------------------------------------------------------


@fauxqs_env()
@pytest.mark.timeout(60)
def test_frozen_child_is_killed_and_replaced(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{queue}:2", "--wait", "1", EBSQS_HEARTBEAT_TIMEOUT="2"
    )  # fmt: skip
    sup.wait_consuming({queue: 2})
    send(broker, queue, ["frozen"], seconds=20)
    victim = wait_until(lambda: [r.pid for r in sup.runs("start") if r.key == "frozen"], 15)[0]
    # Its title turns "busy" from a heartbeat: the master has heard about the running task.
    wait_until(lambda: sup.children().get(victim, ("", 0, ""))[2] == "busy", 5)

    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_until(
        lambda: len(sup.consuming().get(queue, ())) == 2 and victim not in sup.consuming()[queue],
        2 + 2,
        interval=0.05,
        message=lambda: f"children: {sup.children()}",
    )
    assert time.monotonic() - stopped_at < 2 + 2
    # SIGABRT (its stacks dumped), then SIGKILL a murder grace later: the replacement may be up
    # before the victim is gone.
    wait_until(lambda: _gone(victim), 3, interval=0.05, message=f"{victim} still runs")

    [killed] = [e for e in sup.events("child_killed") if e["pid"] == victim]
    assert killed["level"] == "critical" and killed["signal"] == "SIGABRT"
    assert killed["task"] == "sup_tasks.work" and killed["task_id"]
    assert "no heartbeat" in killed["reason"]


@fauxqs_env()
@pytest.mark.timeout(60)
def test_an_inline_task_past_its_hard_limit_is_stopped_and_follows_its_retry_policy(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise("--app", "sup_tasks", "--queues", f"{queue}:1", "--wait", "1")
    sup.wait_consuming({queue: 1})
    # `while True: pass` with time_limit=2 and one retry, then ordinary work behind it.
    body = encode(Envelope(task="sup_tasks.spin", args=("spin",), max_retries=1))
    broker.send(queue, OutgoingMessage(body))
    send(broker, queue, [f"after-{i}" for i in range(5)])

    # Both attempts are stopped; each child is gone within 3 s of its task's start.
    spins = wait_until(
        lambda: len(found := [r for r in sup.runs("start") if r.key == "spin"]) >= 2 and found,
        20,
    )
    assert [run.attempt for run in spins] == [1, 2]
    exits = wait_until(
        lambda: (
            (found := {e["pid"]: e for e in sup.events("child_exited")}).keys()
            >= {run.pid for run in spins}
            and found
        ),
        10,
    )
    overran = {event["task_id"]: event for event in sup.events("task_overran")}
    assert len(overran) == 1 and len(sup.events("task_overran")) == 2
    for run in spins:
        assert exits[run.pid]["exit_code"] == 4
    ends = [event for event in sup.events("worker_exited_after_overrun")]
    assert len(ends) == 2
    for run, end in zip(spins, ends, strict=True):
        assert _timestamp(end) - run.at < 3.0, "the runaway task was not stopped within 3 s"

    # Retried once, then dead-lettered as timed out; the pool kept serving the rest.
    wait_until(lambda: {r.key for r in sup.runs()} >= {f"after-{i}" for i in range(5)}, 20)
    [letter] = wait_until(lambda: broker.receive(f"{queue}-dlq", 10, 1), 10)
    assert letter.attributes["ebsqs-error-type"] == "timed_out"
    assert letter.attributes["ebsqs-attempts"] == "2"
    sup.wait_consuming({queue: 1})


@fauxqs_env()
@pytest.mark.timeout(60)
def test_a_task_holding_the_gil_is_killed_soon_after_its_hard_limit(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    """`sum(range(10**15))` never lets another thread run, heartbeats included; the loop told the
    master the deadline before the task started, so the kill comes seconds past the 1 s limit,
    not at the 30 s heartbeat timeout."""
    queue = create_queue(broker, unique_queue())
    sup = supervise("--app", "sup_tasks", "--queues", f"{queue}:1", "--wait", "1")
    [pids] = sup.wait_consuming({queue: 1}).values()
    send(broker, queue, ["hog"], task="sup_tasks.hog")
    [run] = wait_until(lambda: [r for r in sup.runs("start") if r.key == "hog"], 15)
    [killed] = wait_until(
        lambda: [e for e in sup.events("child_killed") if e["pid"] == run.pid], 20
    )
    assert killed["signal"] == "SIGABRT" and "past its hard limit" in killed["reason"]
    # 1 s limit + 3 s grace, give or take a master tick; the heartbeat timeout is 30 s.
    assert _timestamp(killed) - run.at < 8.0
    assert run.pid in pids
    sup.wait_consuming({queue: 1}, timeout=15)


@fauxqs_env()
@pytest.mark.timeout(60)
def test_a_child_whose_loop_freezes_is_replaced_though_its_heartbeats_go_on(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise(
        "--app", "sup_stall", "--queues", f"{queue}:1", "--wait", "1", "--heartbeat-timeout", "3"
    )
    [pids] = sup.wait_consuming({queue: 1}).values()
    [victim] = pids
    send(broker, queue, ["frozen"], task="sup_stall.freeze")
    [killed] = wait_until(lambda: [e for e in sup.events("child_killed") if e["pid"] == victim], 20)
    assert killed["signal"] == "SIGABRT" and "no progress" in killed["reason"]
    assert not [e for e in sup.events("child_killed") if "no heartbeat" in e.get("reason", "")]
    assert not sup.runs("start")  # the frozen message never started


@fauxqs_env()
@pytest.mark.timeout(60)
def test_a_leaking_child_recycles_itself_after_the_task_that_crossed_the_limit(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    """Each task keeps 20 MiB; the limit is 100 MiB. The child checks its own RSS after every
    task, so no task starts in a process already over the limit (the master's once-a-second view
    let ten prefetched tasks run first)."""
    queue = create_queue(broker, unique_queue())
    sup = supervise(
        "--app",
        "sup_tasks",
        "--queues",
        f"{queue}:1",
        "--wait",
        "1",
        "--max-memory-per-child",
        "100",
    )
    sup.wait_consuming({queue: 1})
    keys = send(broker, queue, [f"leak-{i}" for i in range(10)], task="sup_tasks.leak")
    wait_until(lambda: {r.key for r in sup.runs("done")} >= set(keys), 40)
    started_at = [int(run.extra) for run in sup.runs("start")]
    assert max(started_at) <= 100 << 20, [rss >> 20 for rss in started_at]
    assert len({run.pid for run in sup.runs("start")}) >= 3  # it was recycled more than once
    assert sup.events("child_memory_exceeded")


@fauxqs_env()
@pytest.mark.timeout(60)
def test_after_the_master_dies_a_child_stuck_in_a_long_task_stops_within_the_graceful_timeout(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue(), visibility=60)
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{queue}:1", "--wait", "1", "--graceful-timeout", "2"
    )
    [pids] = sup.wait_consuming({queue: 1}).values()
    [child] = pids
    send(broker, queue, ["long"], seconds=30.0)  # no time limit, under the inline executor
    wait_until(lambda: [r for r in sup.runs("start") if r.key == "long"], 15)
    sup.signal(signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(child) or _zombie(child), 10)
    # It released the message as it went: another consumer gets it long before 60 s.
    [message] = wait_until(lambda: broker.receive(queue, 1, wait_seconds=1), 10)
    assert decode(message.body).args == ("long",)


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@fauxqs_env()
@pytest.mark.timeout(60)
def test_children_that_crash_at_every_boot_stop_the_master_with_exit_code_3(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise("--app", "sup_bootcrash", "--queues", f"{queue}:2", "--wait", "1")
    assert sup.wait_exit(30) == 3
    crashes = [e for e in sup.events("child_exited") if e.get("verdict") == "crashed"]
    assert len(crashes) >= 2 * 4  # limit 5 per slot: four crashes each, then the verdict
    assert any("crashed before consuming" in e.get("reason", "") for e in sup.events())


def _timestamp(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


# -- 4. graceful drain ---------------------------------------------------------------------------


@fauxqs_env()
@pytest.mark.timeout(90)
def test_sigterm_drains_with_nothing_lost_or_run_twice(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    graceful = 10
    sup = supervise(
        "--app",
        "sup_tasks",
        "--queues",
        f"{queue}:6",
        "--wait",
        "1",
        "--graceful-timeout",
        str(graceful),
    )
    sup.wait_consuming({queue: 6}, timeout=20)
    keys = send(broker, queue, (f"m{i:03}" for i in range(200)), seconds=0.5)
    # Six children busy, and some work done.
    wait_until(lambda: len({r.pid for r in sup.runs("start")}) == 6 and len(sup.runs()) >= 12, 20)

    sup.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert sup.wait_exit(graceful) == 0
    assert time.monotonic() - asked < graceful

    done = sup.done_keys()
    started = Counter(run.key for run in sup.runs("start"))
    assert max(done.values()) == 1, "a message ran twice"
    assert started == done, "a task was started but not finished"
    left = drain_queue(broker, queue)
    assert len(left) == len(set(left))
    assert not set(left) & set(done), "a message ran and is still in the queue"
    assert set(left) | set(done) == set(keys), "a message was lost"
    assert 12 <= len(done) < 200
    assert sup.events("drain_completed")


@fauxqs_env()
@pytest.mark.timeout(60)
@pytest.mark.parametrize("signals", [["SIGTERM", "SIGTERM"], ["SIGQUIT"]])
def test_fast_stop_releases_running_messages(
    supervise: Any, broker: SQSBroker, unique_queue: Any, signals: list[str]
) -> None:
    """A second TERM (during a drain), or QUIT, stops at once: running tasks are abandoned and
    their messages released for another worker, not lost."""
    queue = create_queue(broker, unique_queue())
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{queue}:2", "--wait", "1", "--graceful-timeout", "60"
    )  # fmt: skip
    sup.wait_consuming({queue: 2})
    # One at a time: a child fetches up to ten messages, and would hold the second one back.
    keys = send(broker, queue, ["long0"], seconds=60)
    wait_until(lambda: len(sup.runs("start")) == 1, 15)
    keys += send(broker, queue, ["long1"], seconds=60)
    wait_until(lambda: len(sup.runs("start")) == 2, 15)

    for number, name in enumerate(signals):
        if number:
            wait_until(lambda: sup.events("drain_started"), 5)
        sup.signal(signal.Signals[name])
    assert sup.wait_exit(10) == 0
    assert sup.events("fast_stop_started")
    assert not sup.runs("done")
    assert sorted(drain_queue(broker, queue)) == keys  # released, not lost


# -- 5. the master dies ----------------------------------------------------------------------------


@fauxqs_env()
@pytest.mark.timeout(60)
def test_children_exit_when_the_master_is_killed(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise("--app", "sup_tasks", "--queues", f"{queue}:3", "--wait", "2")
    children = sup.wait_consuming({queue: 3})[queue]
    send(broker, queue, ["busy"], seconds=1)
    wait_until(lambda: sup.runs("start"), 15)

    os.kill(sup.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def gone() -> bool:
        return all(not _alive(pid) for pid in children)

    # Idle children let their long poll (2 s here) finish and release what it brings.
    wait_until(gone, 7, message=lambda: f"still alive: {[p for p in children if _alive(p)]}")
    assert time.monotonic() - killed_at < 7
    assert sup.done_keys() == Counter(["busy"])  # the running task was finished, not dropped
    assert not _session_members(sup.pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _session_members(sid: int) -> list[int]:
    members = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getsid(process.pid) == sid and _alive(process.pid):
                members.append(process.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


# -- 6. an app that cannot boot ------------------------------------------------------------------


@fauxqs_env()
@pytest.mark.timeout(30)
def test_import_error_stops_the_master(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise("--app", "sup_broken", "--queues", queue)
    started = time.monotonic()
    assert sup.wait_exit(10) == 3
    assert time.monotonic() - started < 10
    [failed] = sup.events("master_boot_failed")
    assert failed["level"] == "critical"
    assert "sup_broken fails at import on purpose" in failed["error"]
    assert not sup.events("child_spawned")  # no child, let alone a restart storm


@fauxqs_env()
@pytest.mark.timeout(30)
def test_child_that_cannot_boot_stops_the_master(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    missing = unique_queue()  # never created, and children may not create it
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{missing}:3", EBSQS_AUTO_CREATE_QUEUES="false"
    )
    started = time.monotonic()
    assert sup.wait_exit(10) == 3
    assert time.monotonic() - started < 10
    assert len(sup.events("child_spawned")) == 3
    assert not sup.events("child_restarted")
    failures = sup.events("child_boot_failed")
    assert failures and all("does not exist" in f["error"] for f in failures)
    assert any(e["verdict"] == "boot_failed" for e in sup.events("child_exited"))


# -- 7. HUP: fresh code, rolling -------------------------------------------------------------------

HUP_APP = """
import time

from ebsqs import task
from sup_tasks import record

VERSION = "{version}"


@task
def versioned(key: str, seconds: float = 0.0) -> None:
    time.sleep(seconds)
    record("done", key, VERSION)
"""


@fauxqs_env()
@pytest.mark.timeout(90)
def test_hup_rolls_every_child_onto_new_code_without_stopping(
    supervise: Any, broker: SQSBroker, unique_queue: Any, tmp_path: Path
) -> None:
    module = tmp_path / "sup_hup.py"
    module.write_text(HUP_APP.format(version="one"))
    queue = create_queue(broker, unique_queue())
    sup = supervise("--app", "sup_hup", "--queues", f"{queue}:2", "--wait", "1")
    old = sup.wait_consuming({queue: 2})[queue]
    keys = send(
        broker, queue, (f"h{i:03}" for i in range(400)), task="sup_hup.versioned", seconds=0.02
    )
    wait_until(lambda: len(sup.runs()) >= 40, 20)

    module.write_text(HUP_APP.format(version="two, changed on disk"))
    sup.signal(signal.SIGHUP)
    hup_at = time.time()
    wait_until(lambda: sup.events("reload_completed"), 20)
    new = sup.wait_consuming({queue: 2})[queue]
    assert not new & old, "every child was replaced"
    done_at_reload = len(sup.runs())
    assert done_at_reload < len(keys), "the reload finished with work still queued"

    wait_until(
        lambda: sup.done_keys() == Counter(keys),
        30,
        message=lambda: f"{len(sup.runs())} of {len(keys)} done",
    )
    runs = sup.runs()
    assert {run.extra for run in runs if run.pid in new} == {"two, changed on disk"}
    assert {run.extra for run in runs if run.pid in old} == {"one"}
    # Processing never stopped: no long gap between completions around the reload.
    reload_done = time.time()
    times = sorted(run.at for run in runs if hup_at - 1 <= run.at <= reload_done)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert times and max(gaps) < 1.5, f"longest pause {max(gaps):.2f} s"
    # One child per queue at a time: never fewer than N-1 consuming.
    rolled = [e for e in sup.events("child_retired") if e.get("reason") == "reload"]
    assert {e["pid"] for e in rolled} == old


# -- 8. scaling and recycling ----------------------------------------------------------------------


@fauxqs_env()
@pytest.mark.timeout(60)
def test_ttin_ttou_change_children_per_queue(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    a, b = create_queue(broker, unique_queue()), create_queue(broker, unique_queue())
    sup = supervise("--app", "sup_tasks", "--queues", f"{a}:2,{b}:1", "--wait", "1")
    first = sup.wait_consuming({a: 2, b: 1})

    sup.signal(signal.SIGTTIN)
    grown = sup.wait_consuming({a: 3, b: 2})
    assert first[a] < grown[a] and first[b] < grown[b], "scaling up restarted no one"

    sup.signal(signal.SIGTTOU)
    sup.wait_consuming({a: 2, b: 1})
    sup.signal(signal.SIGTTOU)
    shrunk = sup.wait_consuming({a: 1, b: 1})  # never below one per queue
    assert shrunk[b] <= grown[b]

    # A child drained by a direct SIGTERM (systemd signals every process) is replaced.
    [direct] = shrunk[a]
    os.kill(direct, signal.SIGTERM)
    replaced = wait_until(
        lambda: (now := sup.consuming().get(a, set())) and direct not in now and now, 10
    )
    assert len(replaced) == 1
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0


@fauxqs_env()
@pytest.mark.timeout(60)
def test_max_tasks_per_child_recycles_without_losing_messages(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{queue}:2", "--wait", "1", "--max-tasks-per-child", "50"
    )
    sup.wait_consuming({queue: 2})
    keys = send(broker, queue, (f"r{i:03}" for i in range(300)))
    wait_until(lambda: len(sup.runs()) >= 300, 40, message=lambda: f"{len(sup.runs())} done")

    assert sup.done_keys() == Counter(keys), "each message ran exactly once"
    per_child = Counter(run.pid for run in sup.runs())
    assert len(per_child) >= 300 // 55
    assert max(per_child.values()) <= 55  # 50 plus the 10 % jitter
    wait_until(lambda: queue_empty(broker, queue), 10, message="the queue did not empty")
    assert not sup.events("child_killed")
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0


@fauxqs_env()
@pytest.mark.timeout(60)
def test_max_memory_per_child_recycles_a_child_that_grew(
    supervise: Any, broker: SQSBroker, unique_queue: Any
) -> None:
    queue = create_queue(broker, unique_queue())
    # 1 MiB: any child that has run a task is over it (a fresh one is spared, or it would churn).
    sup = supervise(
        "--app", "sup_tasks", "--queues", f"{queue}:1", "--wait", "1",
        "--max-memory-per-child", "1",
    )  # fmt: skip
    [first] = sup.wait_consuming({queue: 1})[queue]
    send(broker, queue, ["grow"])
    retired = wait_until(lambda: sup.events("child_retired"), 10)
    assert retired[0]["pid"] == first and "MiB over 1 MiB" in retired[0]["reason"]
    # The replacement starts while the retired child drains: wait for the old one to be gone.
    [second] = wait_until(
        lambda: first not in (now := sup.consuming().get(queue, set())) and len(now) == 1 and now,
        15,
        message=lambda: f"consuming: {sup.consuming()}",
    )
    assert second != first and sup.done_keys() == Counter(["grow"])
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(15) == 0


def _gone(pid: int) -> bool:
    """Whether ``pid`` exited (or is a zombie waiting for its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True

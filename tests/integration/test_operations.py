"""Operating ``ebsqs supervise``: sd_notify, ``ebsqs status``, ``ebsqs healthcheck``, metrics.

Real masters and children on the embedded SQLite broker (one file per test, safe for many
processes), with ``tests/fixtures`` on ``PYTHONPATH`` for ``ops_tasks``. systemd is played by a
Unix datagram socket the test binds; its messages are collected by a thread with their arrival
times. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ebsqs.brokers import Broker, OutgoingMessage, from_url
from ebsqs.config import Settings
from ebsqs.envelope import Envelope, encode
from ebsqs.ops import status as status_doc
from ebsqs.producer import ensure_queue
from tests import prometheus, servers
from tests.integration.processes import clean_env
from tests.waiting import wait_until

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SUPERVISE = (sys.executable, "-m", "ebsqs", "supervise", "--app", "ops_tasks", "--wait", "1")


# -- helpers ----------------------------------------------------------------------------------


class Systemd:
    """A datagram socket standing in for systemd's notify socket; collects what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.time(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def sent(self, key: str, after: float = 0.0) -> list[tuple[float, str]]:
        """``(time, value)`` of every ``key=value`` line received after ``after`` (wall clock,
        to compare with log timestamps)."""
        found = []
        for at, message in list(self.messages):
            for line in message.split("\n"):
                name, _, value = line.partition("=")
                if name == key and at > after:
                    found.append((at, value))
        return found


class Supervisor:
    """An ``ebsqs supervise --app ops_tasks`` process on a SQLite broker, in its own session."""

    def __init__(self, tmp_path: Path, args: list[str], **env: str) -> None:
        self.tmp_path = tmp_path
        self.log_path = tmp_path / "supervise.log"
        self.status_path = tmp_path / "status.json"
        env = clean_env(
            EBSQS_BROKER_URL=f"sqlite:///{tmp_path / 'ops.db'}",
            EBSQS_LOG_FORMAT="json",
            EBSQS_BACKOFF_BASE="0.05",
            PYTHONPATH=os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")]),
            OPS_GATE=str(tmp_path / "gate"),
            **env,
        )
        if "--status-file" not in args and "XDG_RUNTIME_DIR" not in env:
            args = [*args, "--status-file", str(self.status_path)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*SUPERVISE, *args],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = self.process.pid

    def kill_all(self) -> None:
        """Cleanup: SIGKILL the session this test started (the master and its children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)

    def status(self) -> dict[str, Any] | None:
        """The live status view (as ``ebsqs status --json`` prints it), or None before any."""
        try:
            return status_doc.live_view(status_doc.read_status(self.status_path))
        except status_doc.StatusError:
            return None

    def children(self, phase: str = "running") -> dict[int, dict[str, Any]]:
        view = self.status()
        children = view["children"] if view else []
        return {c["pid"]: c for c in children if c["phase"] == phase}

    def wait_running(self, count: int, timeout: float = 20) -> dict[int, dict[str, Any]]:
        """Wait until exactly ``count`` children consume; return them by pid."""

        def enough() -> dict[int, dict[str, Any]] | None:
            children = self.children()
            return children if len(children) == count else None

        found = wait_until(
            enough,
            timeout,
            interval=0.05,
            message=lambda: f"status: {self.status()}\n{self.describe()}",
        )
        assert found is not None
        return found

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                    found.append(entry)
        return found

    def describe(self) -> str:
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return f"master exit code {self.process.poll()}; last log lines:\n{tail}"


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """``start(*args, **env)`` -> a running :class:`Supervisor`; all are killed at the end."""
    started: list[Supervisor] = []

    def run(*args: str, **env: str) -> Supervisor:
        sup = Supervisor(tmp_path, list(args), **env)
        started.append(sup)
        return sup

    yield run
    for sup in started:
        sup.kill_all()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """The test's own handle on the SQLite file the supervisor uses."""
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    the_broker = from_url(url)
    for queue in ("ops", "other"):
        ensure_queue(the_broker, Settings(broker_url=url), queue)
    yield the_broker
    the_broker.close()


def send(broker: Broker, task: str, count: int, queue: str = "ops", max_retries: int = 0) -> None:
    bodies = [
        encode(Envelope(task=f"ops_tasks.{task}", args=(f"{task}-{i}",), max_retries=max_retries))
        for i in range(count)
    ]
    for first in range(0, count, 10):
        broker.send_batch(queue, [OutgoingMessage(body) for body in bodies[first : first + 10]])


def settled(broker: Broker, queue: str = "ops") -> bool:
    stats = broker.stats(queue)
    return stats.visible == 0 and stats.in_flight == 0 and stats.delayed == 0


def wall_clock(timestamp: str) -> float:
    """A log line's ISO 8601 UTC timestamp as epoch seconds."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def ebsqs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ebsqs", *args],
        cwd=servers.ROOT,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- acceptance 2: the notify protocol ---------------------------------------------------------


@pytest.mark.timeout(90)
def test_notify_protocol_through_a_hang_a_reload_and_a_stop(tmp_path: Path, start: Any) -> None:
    systemd = Systemd(tmp_path / "notify")
    try:
        sup = start(
            "--queues",
            "ops:2",
            "--heartbeat-timeout",
            "4",
            NOTIFY_SOCKET=str(systemd.path),
            WATCHDOG_USEC="1000000",
        )
        # READY=1 once both children consume, with a status line saying so.
        wait_until(lambda: systemd.sent("READY"), 20, message=sup.describe)
        ready_at, _ = systemd.sent("READY")[0]
        first_status = next(v for at, v in systemd.sent("STATUS") if at >= ready_at)
        assert first_status.startswith("ops 2/2 up, 0 busy; done 0, failed 0, restarts 0"), (
            f"{first_status}; {sup.describe()}; exited: {sup.events('child_exited')}"
        )
        assert len(sup.events("child_spawned")) == 2
        assert sup.events("supervisor_ready")
        # Periodic WATCHDOG=1, at half of WATCHDOG_USEC.
        wait_until(lambda: len(systemd.sent("WATCHDOG", after=ready_at)) >= 4, 10)

        # A child frozen with SIGSTOP: the pings stop until its replacement is forked.
        hung_pid = sorted(sup.wait_running(2))[0]
        stopped_at = time.time()
        os.kill(hung_pid, signal.SIGSTOP)
        wait_until(
            lambda: (c := sup.children()) and len(c) == 2 and hung_pid not in c,
            20,
            message=sup.describe,
        )
        replaced_at = time.time()
        wait_until(lambda: systemd.sent("WATCHDOG", after=replaced_at), 10, message=sup.describe)
        pings = [at for at, _ in systemd.sent("WATCHDOG", after=stopped_at)]
        silent_from, silent_to = max(
            zip([stopped_at, *pings[:-1]], pings, strict=True), key=lambda gap: gap[1] - gap[0]
        )
        assert silent_to - silent_from > 1.5, f"the watchdog kept pinging: {pings}"
        [killed] = [e for e in sup.events("child_killed") if e["pid"] == hung_pid][:1]
        assert killed["level"] == "critical" and "no heartbeat" in killed["reason"]
        assert silent_from < wall_clock(killed["timestamp"]) < silent_to

        # HUP: RELOADING=1 (with the monotonic clock), then READY=1 once every child is new.
        reload_at = time.time()
        os.kill(sup.pid, signal.SIGHUP)
        wait_until(lambda: systemd.sent("READY", after=reload_at), 20, message=sup.describe)
        [(reloading_at, _)] = systemd.sent("RELOADING", after=reload_at)
        assert systemd.sent("MONOTONIC_USEC", after=reload_at)
        assert reloading_at < systemd.sent("READY", after=reload_at)[0][0]
        assert sup.events("reload_completed")

        # TERM: STOPPING=1, then a clean exit.
        stop_at = time.time()
        os.kill(sup.pid, signal.SIGTERM)
        assert sup.process.wait(30) == 0
        assert systemd.sent("STOPPING", after=stop_at)
        for event in ("drain_started", "drain_completed", "child_exited", "master_stopped"):
            assert sup.events(event), f"no {event} in the log"
        for entry in sup.events():
            assert "timestamp" in entry and "level" in entry
    finally:
        systemd.close()


# -- acceptance 3: ebsqs status ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_shows_the_text_of_a_child_s_last_error(start: Any, broker: Broker) -> None:
    sup = start("--queues", "ops:1")
    sup.wait_running(1)
    send(broker, "fails", 1)

    def failed_child() -> dict[str, Any] | None:
        result = ebsqs("status", "--status-file", str(sup.status_path), "--json")
        [child] = json.loads(result.stdout)["children"]
        return child if child["last_error"] else None

    child = wait_until(failed_child, 20, interval=0.2, message=lambda: f"{sup.status()}")
    assert child["last_error"] == "failed: ops_tasks.fails (ValueError: fails on purpose: fails-0)"
    table = ebsqs("status", "--status-file", str(sup.status_path)).stdout
    assert "failed: ops_tasks.fails (ValueError: fails on purpose" in table
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.process.wait(30) == 0


@pytest.mark.timeout(60)
def test_status_shows_children_per_queue_and_what_they_run(
    tmp_path: Path, start: Any, broker: Broker
) -> None:
    sup = start("--queues", "ops:2,other:1")
    sup.wait_running(3)
    # A child holds at most its concurrency plus one batch of ten, so 25 keep both busy.
    send(broker, "gated", 25)

    def both_busy() -> dict[str, Any] | None:
        result = ebsqs("status", "--status-file", str(sup.status_path), "--json")
        view = json.loads(result.stdout)
        busy = [c for c in view["children"] if c["queue"] == "ops" and c["state"] == "busy"]
        return view if len(busy) == 2 else None

    view = wait_until(both_busy, 20, interval=0.2, message=lambda: f"{sup.status()}")
    assert view is not None
    by_queue: dict[str, list[dict[str, Any]]] = {}
    for child in view["children"]:
        by_queue.setdefault(child["queue"], []).append(child)
    assert {q: len(c) for q, c in by_queue.items()} == {"ops": 2, "other": 1}
    assert all(c["task"]["name"] == "ops_tasks.gated" for c in by_queue["ops"])
    assert all(c["task"]["running_for"] >= 0 for c in by_queue["ops"])
    assert [c["state"] for c in by_queue["other"]] == ["idle"]
    assert view["targets"] == {"ops": 2, "other": 1}
    assert view["healthy"] is True
    # The master samples each queue's depth (and its dead-letter queue's) from readiness on.
    assert sorted(view["queues"]) == ["ops", "other"]
    assert view["queues"]["ops"]["sampled_at"] is not None
    assert view["queues"]["other"]["dead_letters"] == 0

    table = ebsqs("status", "--status-file", str(sup.status_path))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"ebsqs master {sup.pid}: running")
    assert any(line.startswith("queue ops: ") and "dead letters" in line for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("QUEUE"))
    rows = lines[header + 1 :]
    assert len(rows) == 3
    assert sum("ops_tasks.gated" in row for row in rows) == 2
    pid_column = lines[header].index("PID") + len("PID")
    assert all(row[pid_column - 1].isdigit() for row in rows)  # right-aligned under PID

    (tmp_path / "gate").touch()
    wait_until(
        lambda: (s := sup.status()) and s["counts"]["succeeded"] == 25, 20, message=sup.describe
    )
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.process.wait(30) == 0
    assert not sup.status_path.exists()


# -- acceptance 4: ebsqs healthcheck -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_healthcheck_is_healthy_while_idle_and_not_after_the_master_dies(
    tmp_path: Path, start: Any
) -> None:
    runtime = tmp_path / "run"
    env = clean_env(XDG_RUNTIME_DIR=str(runtime))
    sup = start("--queues", "ops:2", "--heartbeat-timeout", "4", XDG_RUNTIME_DIR=str(runtime))
    sup.status_path = runtime / "ebsqs" / f"master-{sup.pid}.json"  # the default place
    wait_until(lambda: ebsqs("healthcheck", env=env).returncode == 0, 20, message=sup.describe)
    # Still healthy several status rewrites later, with nothing to do (past the stale limit
    # of half the heartbeat timeout).
    written = sup.status()["written_at"]
    wait_until(lambda: sup.status()["written_at"] > written + 2.5, 10)
    healthy = ebsqs("healthcheck", env=env)
    assert (healthy.returncode, healthy.stdout) == (0, f"healthy: master {sup.pid}\n")

    os.kill(sup.pid, signal.SIGKILL)
    sup.process.wait(10)
    dead = ebsqs("healthcheck", env=env)
    assert dead.returncode == 1
    assert dead.stdout == f"unhealthy: master {sup.pid} is not running\n"


# -- acceptance 5: metrics -----------------------------------------------------------------------


def scrape(port: int) -> dict[prometheus.Key, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return prometheus.parse(response.read().decode())


def totals(samples: dict[prometheus.Key, float], metric: str) -> dict[str, float]:
    """Per task, for queue ``ops``."""
    return {
        dict(labels)["task"]: value
        for (name, labels), value in samples.items()
        if name == metric and dict(labels).get("queue") == "ops"
    }


@pytest.mark.timeout(90)
def test_metrics_count_known_outcomes_exactly_across_a_child_restart(
    start: Any, broker: Broker
) -> None:
    port = servers.free_port()
    sup = start("--queues", "ops:2", "--metrics-port", str(port))
    sup.wait_running(2)

    def batch(ok: int, fails: int, flaky: int) -> None:
        send(broker, "ok", ok)
        send(broker, "fails", fails)
        send(broker, "flaky", flaky, max_retries=1)

    def reached(succeeded: int, failed: int, retried: int) -> bool:
        samples = scrape(port)
        return (
            sum(totals(samples, "ebsqs_tasks_succeeded_total").values()) == succeeded
            and sum(totals(samples, "ebsqs_tasks_failed_total").values()) == failed
            and sum(totals(samples, "ebsqs_tasks_retried_total").values()) == retried
            and settled(broker)
        )

    batch(ok=25, fails=3, flaky=2)
    wait_until(lambda: reached(27, 3, 2), 30, interval=0.1, message=lambda: str(scrape(port)))

    # Between batches, with every delete done: SIGKILL a child; the master replaces it.
    victim = sorted(sup.children())[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: (c := sup.children()) and len(c) == 2 and victim not in c, 20, message=sup.describe
    )

    batch(ok=22, fails=2, flaky=1)
    wait_until(lambda: reached(50, 5, 3), 30, interval=0.1, message=lambda: str(scrape(port)))

    samples = scrape(port)
    assert totals(samples, "ebsqs_tasks_succeeded_total") == {
        "ops_tasks.ok": 47,
        "ops_tasks.flaky": 3,
        "ops_tasks.fails": 0,
    }
    assert totals(samples, "ebsqs_tasks_failed_total")["ops_tasks.fails"] == 5
    assert totals(samples, "ebsqs_tasks_retried_total")["ops_tasks.flaky"] == 3
    assert totals(samples, "ebsqs_tasks_dead_lettered_total")["ops_tasks.fails"] == 5
    assert totals(samples, "ebsqs_task_duration_seconds_count") == {
        "ops_tasks.ok": 47,
        "ops_tasks.flaky": 6,  # two attempts each
        "ops_tasks.fails": 5,
    }
    assert prometheus.value(samples, "ebsqs_child_restarts_total", queue="ops") == 1
    # 55 sent and 3 retries
    assert prometheus.value(samples, "ebsqs_messages_received_total", queue="ops") == 58
    assert broker.stats("ops-dlq").visible == 5

"""The durable outbox against real faults: real processes, PostgreSQL, fauxqs behind the proxy.

- A web process commits and is SIGKILLed before anything that waits for the commit runs: the
  rows are in the database, the supervisor's relay sends them and every task runs once.
- SQS unreachable (the proxy refuses connections): the rows wait with their error, then drain.
- Two relays at once: every row reaches the queue once, counted by reading the whole queue.

The judges are the ledger the tasks write, the queue itself, and the outbox table read with a
plain psycopg connection (this process never sets Django up).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import postgres, servers
from tests.faults.harness import APP, EbsqsProcess, Rig, keys
from tests.waiting import wait_until

pytestmark = [pytest.mark.fauxqs, pytest.mark.postgres, pytest.mark.timeout(60)]

PROJECT = Path(__file__).resolve().parent.parent / "fixtures" / "djproject"
PG_DSN = postgres.DSN


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL database with the fixture project's tables; the Django environment
    of the processes that use it."""
    reason = postgres.unavailable()
    if reason is not None:
        pytest.skip(reason)
    import psycopg

    name = f"ebsqs_outbox_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    sqlite = tmp_path_factory.mktemp("outbox") / "default.sqlite3"
    env = {
        "DJANGO_SETTINGS_MODULE": "djproject.settings_outbox",
        "DJPROJECT_POSTGRES": name,
        "DJPROJECT_SQLITE": str(sqlite),
        "PYTHONPATH": os.pathsep.join([str(PROJECT), str(servers.ROOT)]),
    }
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        for alias in ("default", "postgres"):  # the dashboard's table is on the default one
            done = subprocess.run(
                [sys.executable, "manage.py", "migrate", "--database", alias, "-v", "0"],
                cwd=PROJECT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
        yield env
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def table(env: dict[str, str]) -> list[tuple[str, int, str]]:
    """The outbox's rows: (task id, attempts, last error)."""
    import psycopg

    dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={env['DJPROJECT_POSTGRES']}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = conn.execute(
            "SELECT task_id, attempts, last_error FROM ebsqs_outboxmessage ORDER BY id"
        ).fetchall()
    return [(str(a), int(b), str(c)) for a, b, c in found]


class ManagePy(EbsqsProcess):
    """``manage.py ebsqs <command> ...`` of the fixture project, in a session of its own."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "ebsqs", *args],
            cwd=PROJECT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid


def project_env(rig: Rig, database: dict[str, str], **extra: str) -> dict[str, str]:
    """A process of the fixture project: SQS through the rig's proxy, its queue the default."""
    return {**rig.env(), **database, "EBSQS_DEFAULT_QUEUE": rig.queue, **extra}


def web(rig: Rig, env: dict[str, str], names: list[str], *flags: str) -> int:
    """Run the web-like process to its end; its exit code (-9 when it killed itself)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.outbox_web", *flags, *names],
        cwd=servers.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "committed" in done.stdout or flags, done.stdout + done.stderr
    rig.sent += names
    return done.returncode


def events(process: EbsqsProcess, name: str) -> list[dict[str, object]]:
    found = []
    for line in process.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
    return found


def test_web_process_killed_after_commit_loses_nothing(rig: Rig, database: dict[str, str]) -> None:
    rig.create()
    # A short visibility: the long poll of the child killed below may still take messages after
    # its death, and they must come back soon.
    env = project_env(rig, database, EBSQS_VISIBILITY_TIMEOUT="3")
    names = keys("k", 25)
    code = web(rig, env, names, "--die-after-commit")

    assert code == -9  # SIGKILLed right after the commit, before any on-commit callback
    assert rig.proxy.requests["SendMessageBatch"] + rig.proxy.requests["SendMessage"] == 0
    assert len(table(database)) == 25  # committed with the transaction, waiting

    master = ManagePy(
        ["supervise", "--app", APP, "--queues", rig.queue, "--workers", "1", "--wait", "1",
         "--log-format", "json"],
        env,
        rig.tmp_path / "supervise.log",
    )  # fmt: skip
    rig.started.append(master)
    rig.wait_settled(30)  # the master's relay sent them, its child ran them
    wait_until(lambda: not table(database), 10, message=lambda: f"rows: {table(database)}")
    assert rig.ledger.duplicates() == {}  # each task ran once
    assert rig.lost() == set()

    # A child replaced while the relay runs: the fork leaves the relay's connections working.
    [child] = master.children()
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: master.children() not in ([], [child]), 15, message="no new child")
    web(rig, env, keys("after-fork", 5))
    rig.wait_settled(20)
    failures = [
        e for name in ("outbox_relay_failed", "outbox_listen_failed") for e in events(master, name)
    ]
    assert failures == []
    assert rig.ledger.duplicates() == {}

    master.signal(signal.SIGTERM)  # the relay thread ends with the drain
    assert master.wait(30) == 0
    assert events(master, "outbox_relay_stopped")


def test_sqs_unreachable_rows_wait_then_drain(rig: Rig, database: dict[str, str]) -> None:
    rig.create()
    env = project_env(rig, database, DJPROJECT_OUTBOX_MAX_BACKOFF="1")
    relay = ManagePy(["outbox", "relay", "--log-format", "json"], env, rig.tmp_path / "relay.log")
    rig.started.append(relay)
    wait_until(lambda: events(relay, "outbox_relay_started"), 15, message="relay not started")

    names = keys("d", 12)
    rig.proxy.refuse(600)  # SQS is gone until the test says otherwise
    # A web process that never talked to SQS: a kept send asks the queue nothing.
    site = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.outbox_web", *names],
        cwd=servers.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert site.returncode == 0 and site.stdout.strip() == "committed", site.stderr
    rig.sent += names
    # The first ten are tried, fail, back off and are tried again (the batch after them waits:
    # a pass that sent nothing ends there).
    wait_until(
        lambda: sum(attempts >= 2 for _, attempts, _ in table(database)) == 10,
        20,
        message=lambda: f"rows: {table(database)}",
    )
    kept = table(database)
    assert len(kept) == 12  # every row waits, none lost
    assert all("cannot reach SQS" in error for _, attempts, error in kept if attempts)

    rig.proxy.clear()  # SQS is back
    wait_until(lambda: not table(database), 20, message=lambda: f"rows: {table(database)}")
    worker = rig.start("worker")
    rig.wait_settled(20)
    assert rig.ledger.duplicates() == {}
    assert worker.process.poll() is None
    relay.signal(signal.SIGTERM)  # a last pass, then a clean exit
    assert relay.wait(15) == 0
    assert events(relay, "outbox_relay_stopped")


def test_two_relays_at_once_send_every_row_once(rig: Rig, database: dict[str, str]) -> None:
    rig.create(visibility=300)
    env = project_env(rig, database)
    names = keys("p", 200)
    for start in range(0, len(names), 50):
        web(rig, env, names[start : start + 50])
    assert len(table(database)) == 200
    rig.proxy.latency(0.05, "SendMessageBatch")  # so the two relays overlap

    relays = [
        ManagePy(
            ["outbox", "relay", "--log-format", "json", "--log-level", "debug"],
            env,
            rig.tmp_path / f"relay-{i}.log",
        )
        for i in range(2)
    ]
    rig.started += relays
    wait_until(lambda: not table(database), 40, message=lambda: f"{len(table(database))} rows")

    ids: Counter[str] = Counter()
    while True:
        batch = rig.broker.receive(rig.queue, 10, wait_seconds=1, visibility_timeout=300)
        if not batch:
            break
        ids.update(json.loads(m.body)["args"][0] for m in batch)
    assert sorted(ids) == sorted(names)  # every row reached the queue
    assert [key for key, n in ids.items() if n > 1] == []  # and none twice
    sent_by = [sum(int(e["sent"]) for e in events(r, "outbox_batch_sent")) for r in relays]
    assert sum(sent_by) == 200 and all(sent_by), sent_by  # both relays took part

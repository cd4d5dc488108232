"""The fixture project under the real supervisor: ``manage.py`` subprocesses on a local SQS server.

fauxqs, because several children consume at once and an exactly-once count must not be spoiled
by the server (see ``/work/shared/TESTING.md``); where it is not installed these tests skip.
Each test gets its own queue prefix, so the session-wide server is shared safely.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.django.conftest import djproject_env
from tests.django.helpers import PROJECT, managed, stop
from tests.waiting import wait_until

pytestmark = [pytest.mark.fauxqs, pytest.mark.timeout(90)]


def rows(alias: str) -> list[tuple[str, int, int | None]]:
    from shop.models import Row

    return list(Row.objects.using(alias).values_list("name", "pid", "backend_pid"))


def count(alias: str) -> int:
    from django.db import connections
    from shop.models import Row

    try:
        return Row.objects.using(alias).count()
    finally:
        connections[alias].close()  # see the rows the children commit, not a snapshot


def healthcheck(pidfile: Path, env: dict[str, str]) -> int:
    """``manage.py healthcheck --pidfile ...``'s exit code."""
    done = subprocess.run(
        [sys.executable, "manage.py", "healthcheck", "--pidfile", str(pidfile)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        timeout=30,
    )
    return done.returncode


def probe_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_supervise_two_children_write_exactly_200_rows(
    sqs: dict[str, str], db_alias: str, tmp_path: Path
) -> None:
    """Acceptance 1, on both databases; with probes proving the forks are clean (9)."""
    from shop.tasks import record

    names = [f"row-{i}" for i in range(200)]
    record.delay_many([(name, db_alias) for name in names])
    probe, log = tmp_path / "probe.jsonl", tmp_path / "supervise.log"
    env = djproject_env(**sqs, DJPROJECT_PROBE=str(probe))

    command = "ebsqs supervise --queues a --workers 2 --wait 1 --log-format json"
    with managed(*command.split(), env=env, log=log) as master:
        wait_until(
            lambda: count(db_alias) >= 200 or master.poll() is not None,
            60,
            interval=0.2,
            message=lambda: f"{count(db_alias)} rows; log:\n{tail(log)}",
        )
        assert stop(master) == 0, tail(log)

    written = rows(db_alias)
    assert sorted(name for name, _, _ in written) == sorted(names)  # exactly once each
    events = probe_events(probe)
    master_pid = master.pid
    children = {e["pid"] for e in events if e["event"] == "worker_started"}
    assert len(children) == 2 and all(
        e["parent"] == master_pid for e in events if e["event"] == "worker_started"
    )
    assert {pid for _, pid, _ in written} <= children
    # The master used the database, yet held no connection at any fork.
    forks = [e for e in events if e["event"] == "forking"]
    assert len(forks) == 2 and all(e["open_connections"] == [] for e in forks)
    if db_alias == "postgres":
        master_sessions = {e["backend_pid"] for e in events if e["event"] == "master_queried"}
        child_sessions = {session for _, _, session in written}
        assert None not in child_sessions and not child_sessions & master_sessions


def test_process_queue_processes_both_queues(sqs: dict[str, str], tmp_path: Path) -> None:
    """Acceptance 6: the django-eb-sqs command line, whitespace and all."""
    from shop.tasks import record

    record.delay_many([(f"a-{i}",) for i in range(20)])
    record.send_with(queue_name="b").delay_many([(f"b-{i}",) for i in range(20)])
    log = tmp_path / "process_queue.log"

    pidfile = tmp_path / "ebsqs.pid"
    env = djproject_env(**sqs)
    command = ["process_queue", "--queues", "a, b", "--workers", "1", "--wait", "1"]
    with managed(*command, "--pidfile", str(pidfile), env=env, log=log) as master:
        wait_until(
            lambda: count("default") >= 40 or master.poll() is not None,
            60,
            interval=0.2,
            message=lambda: f"{count('default')} rows; log:\n{tail(log)}",
        )
        # django-eb-sqs's liveness probe, answered by the running supervisor.
        wait_until(lambda: healthcheck(pidfile, env) == 0, 20, interval=0.2)
        assert stop(master) == 0, tail(log)
    assert healthcheck(pidfile, env) != 0

    names = sorted(name for name, _, _ in rows("default"))
    assert names == sorted([f"a-{i}" for i in range(20)] + [f"b-{i}" for i in range(20)])


def test_django_task_runs_under_the_supervisor(sqs: dict[str, str], tmp_path: Path) -> None:
    """Acceptance 7: enqueued through the ebsqs backend of django.tasks / django-tasks."""
    from shop.tasks import dj_record, dj_with_context

    for i in range(5):
        dj_record.enqueue(f"dj-{i}")
    result = dj_with_context.enqueue("ctx")
    log = tmp_path / "supervise.log"

    command = "ebsqs supervise --queues djtasks --workers 1 --wait 1"
    with managed(*command.split(), env=djproject_env(**sqs), log=log) as master:
        wait_until(
            lambda: count("default") >= 6 or master.poll() is not None,
            60,
            interval=0.2,
            message=lambda: f"{count('default')} rows; log:\n{tail(log)}",
        )
        assert stop(master) == 0, tail(log)

    names = sorted(name for name, _, _ in rows("default"))
    assert names == sorted([f"dj-{i}" for i in range(5)] + [f"ctx:attempt=1:id={result.id}"])

"""Database hygiene around tasks and forks, on SQLite and PostgreSQL.

- A task after one that closed or broke its connection still succeeds, in every executor.
- ``CONN_MAX_AGE`` is respected: persistent connections are reused, others are not.
- The forking process holds no connection at the fork (the ``before_fork`` hook).
- A task whose database connection dropped under it is retried, not dead-lettered (unless
  ``EBSQS["retry_database_errors"]`` is False); other failures keep their classification.
- Fork safety on PostgreSQL: a forked child's first query uses its own session, and the
  parent's connection, the very same object, still works after the child exits, even when the
  child closed every connection it had.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings

from ebsqs import current, middleware, task
from ebsqs.contrib.django.db import DB_HYGIENE
from ebsqs.envelope import Envelope
from ebsqs.executors.execution import Job, Outcome, OutcomeKind, run_job
from ebsqs.registry import registry
from tests.django.helpers import run_worker

pytestmark = pytest.mark.timeout(30)


@task(queue_name="a")  # no retries: a dropped connection must not need one
def drops_connection_once(alias: str, marker: str) -> None:
    """Have PostgreSQL end this task's session on its first run; write a row on the next.

    ``marker`` is a file that does not exist yet: the first run (in whatever process) creates it.
    """
    from shop.tasks import write_row

    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        write_row(f"run after the drop, attempt {current().attempt}", alias)
        return
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    write_row("never: the session is gone", alias)


@task(queue_name="a")
def bad_query(alias: str) -> None:
    """Fail with a database error that no retry fixes."""
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT * FROM no_such_table")


def outcome_of(fn: Any, *args: Any) -> tuple[Job, Outcome]:
    """Run one attempt of a task here, as an executor would, and return its job and outcome."""
    job = Job("message-1", Envelope(task=fn.name, args=args, max_retries=1), "a")
    return job, run_job(job, registry)


@pytest.fixture(autouse=True)
def _broker() -> Iterator[None]:
    with override_settings(EBSQS={"broker_url": "memory://hygiene"}):
        yield


def rows(alias: str) -> list[tuple[str, int | None, int | None]]:
    from shop.models import Row

    return list(Row.objects.using(alias).order_by("id").values_list("name", "pid", "backend_pid"))


@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
def test_task_after_a_closed_or_broken_connection_succeeds(db_alias: str, executor: str) -> None:
    from shop.tasks import break_connection, close_connection, record

    close_connection.delay(db_alias)
    record.delay("after close", db_alias)
    break_connection.delay(db_alias)
    record.delay("after break", db_alias)

    worker = run_worker(["a"], executor=executor, concurrency=1)

    assert [name for name, _, _ in rows(db_alias)] == ["after close", "after break"]
    assert (worker.counters.total("succeeded"), worker.counters.total("failed")) == (4, 0)


def test_without_the_middleware_a_broken_connection_fails_the_next_task(db_alias: str) -> None:
    """The control: the test above would fail if the middleware did nothing."""
    from shop.tasks import break_connection, record

    middleware.MIDDLEWARE.remove(DB_HYGIENE)
    break_connection.delay(db_alias)
    record.delay("after break", db_alias)

    worker = run_worker(["a"])

    assert worker.counters.total("failed") == 1
    connections[db_alias].close()  # the inline executor ran the tasks in this thread
    assert rows(db_alias) == []


@pytest.mark.postgres
def test_task_after_postgres_ended_the_session_succeeds(
    pg_alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shop.tasks import kill_own_session, record

    # A persistent connection: only the error in the first task tells Django it is gone.
    monkeypatch.setitem(connections[pg_alias].settings_dict, "CONN_MAX_AGE", 60)
    connections[pg_alias].close()
    kill_own_session.delay(pg_alias)
    record.delay("after kill", pg_alias)

    # It kills its session on every run: fail it once here rather than redeliver it.
    with override_settings(
        EBSQS={"broker_url": "memory://hygiene", "retry_database_errors": False}
    ):
        worker = run_worker(["a"])

    assert [name for name, _, _ in rows(pg_alias)] == ["after kill"]
    assert (worker.counters.total("succeeded"), worker.counters.total("failed")) == (1, 1)


@pytest.mark.postgres
def test_a_failure_on_a_dropped_connection_is_classified_for_redelivery(
    pg_alias: str, tmp_path: Path
) -> None:
    job, outcome = outcome_of(drops_connection_once, pg_alias, str(tmp_path / "dropped"))
    assert (outcome.kind, outcome.redeliver) == (OutcomeKind.FAILED, False)
    assert outcome.error_type == "django.db.utils.OperationalError"

    classified = DB_HYGIENE.classify(job, outcome)

    assert classified.redeliver
    assert dataclasses.replace(classified, redeliver=False) == outcome  # nothing else changed
    assert rows(pg_alias) == []


@pytest.mark.postgres
def test_retry_database_errors_false_keeps_the_failure_as_it_was(
    pg_alias: str, tmp_path: Path
) -> None:
    job, outcome = outcome_of(drops_connection_once, pg_alias, str(tmp_path / "dropped"))

    with override_settings(
        EBSQS={"broker_url": "memory://hygiene", "retry_database_errors": False}
    ):
        classified = DB_HYGIENE.classify(job, outcome)

    assert classified is outcome


@pytest.mark.postgres
def test_other_database_failures_and_successes_are_left_alone(pg_alias: str) -> None:
    from shop.tasks import record

    failed_job, failed = outcome_of(bad_query, pg_alias)
    ok_job, succeeded = outcome_of(record, "fine", pg_alias)

    assert failed.error_type == "django.db.utils.ProgrammingError"
    assert DB_HYGIENE.classify(failed_job, failed) is failed
    assert succeeded.kind is OutcomeKind.SUCCEEDED
    assert DB_HYGIENE.classify(ok_job, succeeded) is succeeded


@pytest.mark.postgres
@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
def test_a_task_whose_connection_dropped_runs_again_without_retries_of_its_own(
    pg_alias: str, executor: str, tmp_path: Path
) -> None:
    """Issue 16.11: with the default max_retries=0 the task is redelivered, as after a crash, and
    the run after the drop is still its first attempt."""
    drops_connection_once.delay(pg_alias, str(tmp_path / "dropped"))

    worker = run_worker(["a"], executor=executor)

    assert [name for name, _, _ in rows(pg_alias)] == ["run after the drop, attempt 1"]
    counters = worker.counters
    totals = [counters.total(n) for n in ("redelivered", "succeeded", "failed", "dead_lettered")]
    assert totals == [1, 1, 0, 0]


@pytest.mark.postgres
@pytest.mark.parametrize(("max_age", "reused"), [(0, False), (60, True)])
def test_conn_max_age_is_respected(
    pg_alias: str, monkeypatch: pytest.MonkeyPatch, max_age: int, reused: bool
) -> None:
    from shop.tasks import record

    monkeypatch.setitem(connections[pg_alias].settings_dict, "CONN_MAX_AGE", max_age)
    connections[pg_alias].close()
    record.delay("first", pg_alias)
    record.delay("second", pg_alias)

    run_worker(["a"])

    (_, _, first), (_, _, second) = rows(pg_alias)
    assert (first == second) is reused
    connections[pg_alias].close()


def test_before_fork_leaves_no_connection_open(db_alias: str) -> None:
    from shop.models import Row

    Row.objects.using(db_alias).count()
    assert connections[db_alias].connection is not None

    middleware.before_fork()

    assert [c.alias for c in connections.all(initialized_only=True) if c.connection] == []


def _backend_pid(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


@pytest.mark.postgres
@pytest.mark.parametrize("child_closes_everything", [False, True])
def test_forked_child_uses_its_own_postgres_session(
    pg_alias: str, child_closes_everything: bool
) -> None:
    """The child inherits an open connection (no before_fork hook ran: a plain os.fork())."""
    parent_session = _backend_pid(pg_alias)
    parent_connection = connections[pg_alias].connection
    read_end, write_end = os.pipe()

    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's cleanup
        code = 1
        try:
            os.close(read_end)
            report = {"inherited": connections[pg_alias].connection is not None}
            report["session"] = _backend_pid(pg_alias)
            if child_closes_everything:
                connections.close_all()
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)

    os.close(write_end)
    with os.fdopen(read_end) as reader:
        report = json.loads(reader.read() or "{}")
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {"inherited": False, "session": report["session"]}
    assert report["session"] != parent_session
    # The parent's connection is the same object, still open, on the same session.
    assert connections[pg_alias].connection is parent_connection
    assert _backend_pid(pg_alias) == parent_session

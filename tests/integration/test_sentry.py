"""A failed task reaches Sentry once, with its context, through sentry-sdk's logging integration.

A real ``ebsqs worker`` imports an app that initialises sentry-sdk (its default integrations,
nothing ebsqs-specific) with a transport that records each event in a file instead of sending
it (see ``tests/fixtures/logging_tasks.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import logging_tasks
from tests.integration.processes import Backend, WorkerProcess
from tests.waiting import wait_until

pytest.importorskip("sentry_sdk")
pytestmark = pytest.mark.timeout(60)


def recorded(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
def test_a_failed_task_is_one_sentry_event_with_its_context(
    backend: Backend, tmp_path: Path, executor: str
) -> None:
    backend.create("applog")
    path = tmp_path / "sentry.jsonl"
    env = {**backend.env, logging_tasks.SENTRY_RECORD_ENV: str(path)}
    args = ["--app", "tests.fixtures.logging_tasks", "--queues", "applog", "--wait", "1"]
    with WorkerProcess([*args, "--executor", executor], env, tmp_path / "w.log") as worker:
        task_id = logging_tasks.fails.delay("k1")
        wait_until(lambda: worker.events("task_failed"), timeout=20, message=worker.describe)
        # One more task, after the failure: any duplicate would have been recorded by then.
        logging_tasks.app_line.delay("after")
        wait_until(lambda: worker.events("app_line_logged after"), 20, message=worker.describe)
        assert worker.stop() == 0, worker.describe()

    [event] = recorded(path)  # once: no other line duplicates the failure
    assert event["level"] == "error"
    assert event["logger"] == "ebsqs.worker.settle"
    assert event["logentry"]["message"] == "task_failed"
    extra = event["extra"]
    assert (extra["task"], extra["task_id"]) == (logging_tasks.fails.name, task_id)
    assert extra["queue"] == "applog" and extra["attempt"] == 1 and extra["message_id"]
    assert extra["error_type"] == "builtins.ValueError" and extra["error"] == "boom k1"
    assert "ValueError: boom k1" in extra["traceback"]
    # The worker's JSON line for the same failure is the same one.
    [line] = worker.events("task_failed")
    assert (line["task_id"], line["message_id"]) == (task_id, extra["message_id"])

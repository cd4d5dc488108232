"""``ebsqs periodic list``: each periodic task with its schedule, zone, queue and next runs."""

from __future__ import annotations

import datetime as dt
import itertools
import json

import pytest
from click.testing import CliRunner

from ebsqs.cli import main
from ebsqs.periodic.ticks import parse_iso

pytestmark = pytest.mark.timeout(30)

APP = "tests.fixtures.periodic_tasks"


def test_list_shows_schedule_zone_queue_and_next_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBSQS_DEFAULT_QUEUE", "ticks.fifo")
    before = dt.datetime.now(dt.UTC)
    result = CliRunner().invoke(main, ["periodic", "list", "--app", APP, "--count", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["task"]: row for row in map(json.loads, result.output.splitlines())}
    report = rows["periodic.report"]
    assert (report["schedule"], report["tz"], report["queue"], report["missed"]) == (
        "*/5 * * * *",
        "Europe/Berlin",
        "ticks.fifo",
        "last",
    )
    runs = [parse_iso(text) for text in report["next"]]
    assert len(runs) == 3 and runs[0] > before
    assert all(run.minute % 5 == 0 and run.second == 0 for run in runs)
    assert [b - a for a, b in itertools.pairwise(runs)] == [dt.timedelta(minutes=5)] * 2
    tick = rows["tests.fixtures.periodic_tasks.tick"]
    assert tick["schedule"] == "every 0:00:01" and tick["tz"] == "UTC"


def test_list_in_text_names_each_task_on_one_line() -> None:
    result = CliRunner().invoke(main, ["periodic", "list", "--app", APP, "--count", "1"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("periodic.report")]
    assert "*/5 * * * *  tz=Europe/Berlin  queue=default  missed=last  next: " in line

"""The status file: writing it atomically, finding it, judging health, and rendering it."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from ebsqs.counters import Counters, TaskStats
from ebsqs.ops import status
from ebsqs.ops.cli import healthcheck
from ebsqs.ops.cli import status as status_command
from ebsqs.ops.depth import QueueDepth
from ebsqs.supervisor.config import QueueSpec, SupervisorConfig
from ebsqs.supervisor.heartbeat import Beat, decode, encode
from ebsqs.supervisor.snapshot import (
    ChildSnapshot,
    CurrentTask,
    MasterState,
    Phase,
    SupervisorSnapshot,
)
from ebsqs.supervisor.table import Table

pytestmark = pytest.mark.timeout(30)

NOW = 1_700_000_000.0


def child(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "queue": "emails",
        "slot": 1,
        "pid": 1001,
        "phase": "running",
        "state": "idle",
        "generation": 0,
        "uptime": 120.0,
        "heartbeat_age": 0.4,
        "in_flight": 0,
        "task": None,
        "counts": {"succeeded": 10, "failed": 1, "retried": 2, "dead_lettered": 1},
        "rss": 50 * 1024 * 1024,
        "restarts": 0,
    }
    return {**base, **changes}


def doc(children: list[dict[str, Any]] | None = None, **master: Any) -> dict[str, Any]:
    """A status document written by this test process (so its master counts as alive)."""
    me = psutil.Process()
    return {
        "version": status.VERSION,
        "written_at": NOW,
        "master": {
            "pid": me.pid,
            "create_time": me.create_time(),
            "state": "running",
            "uptime": 3600.0,
            "heartbeat_timeout": 30.0,
            "metrics_url": None,
            **master,
        },
        "targets": {"emails": 1},
        "counts": {"succeeded": 10, "failed": 1, "retried": 2, "dead_lettered": 1},
        "restarts": 0,
        "recycled": 0,
        "children": [child()] if children is None else children,
    }


# -- writing and reading --------------------------------------------------------------------


def test_write_replaces_atomically_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    status.write_status(path, doc())
    status.write_status(path, doc(state="reloading"))
    assert status.read_status(path)["master"]["state"] == "reloading"
    assert sorted(p.name for p in path.parent.iterdir()) == ["status.json"]  # no temp files left
    assert path.stat().st_mode & 0o777 == 0o644


def test_read_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(status.StatusError, match="is the supervisor running"):
        status.read_status(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(status.StatusError, match="cannot read"):
        status.read_status(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(status.StatusError, match="version"):
        status.read_status(bad)


def test_status_file_logs_a_failure_once_and_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    writer = status.StatusFile(blocker / "status.json")  # a file where a directory should be
    with capture_logs() as logs:
        writer.write(doc())
        writer.write(doc())
        writer.remove()
    assert [entry["event"] for entry in logs] == ["status_file_failed"]


def test_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert status.status_path("/x/s.json", "/run/e.pid", 7) == Path("/x/s.json")
    assert status.status_path(None, "/run/ebsqs.pid", 7) == Path("/run/ebsqs.status.json")
    assert status.status_path(None, None, 7) == tmp_path / "ebsqs" / "master-7.json"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert status.default_dir().name == f"ebsqs-{os.getuid()}"


def test_readers_find_status_files_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(status, "SYSTEM_RUNTIME_DIR", tmp_path / "system")
    old = tmp_path / "ebsqs" / "master-1.json"
    new = tmp_path / "system" / "emails" / "status.json"
    status.write_status(old, doc())
    status.write_status(new, doc())
    os.utime(old, (1, 1))
    (tmp_path / "ebsqs" / ".master-1.json.tmp").write_text("")
    assert status.find_status_files() == [new, old]
    assert status.find_status_files(pidfile="/run/x.pid") == [Path("/run/x.status.json")]


# -- health ---------------------------------------------------------------------------------


def test_an_idle_supervisor_is_healthy() -> None:
    assert status.check_health(doc(), now=NOW + 1) == status.Health(True)


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (doc(pid=2**22 + 12345), "is not running"),
        (doc(create_time=1.0), "is not running"),  # the pid was reused by another process
        (doc(state="stopping"), "is stopping"),
        (doc(state="starting"), "is starting"),
        (doc([]), "queue emails: 0 of 1 children up"),
        (doc([child(phase="killing")]), "being killed"),
        (doc([child(heartbeat_age=16.0)]), "no heartbeat for 16 s"),
    ],
)
def test_unhealthy_reasons(document: dict[str, Any], reason: str) -> None:
    health = status.check_health(document, now=NOW + 0.25)
    assert not health.ok
    assert reason in health.reason


def test_a_stale_document_is_unhealthy() -> None:
    health = status.check_health(doc(), now=NOW + 11)
    assert not health.ok
    assert "11 s old" in health.reason


def test_heartbeat_age_counts_the_document_s_age() -> None:
    assert status.check_health(doc([child(heartbeat_age=12.0)]), now=NOW + 2).ok
    assert not status.check_health(doc([child(heartbeat_age=12.0)]), now=NOW + 4).ok


def test_one_child_short_is_fine_during_a_reload() -> None:
    document = doc([child()], state="reloading")
    document["targets"] = {"emails": 2}
    assert status.check_health(document, now=NOW).ok


# -- rendering ------------------------------------------------------------------------------


def busy_doc() -> dict[str, Any]:
    task = {"name": "myapp.tasks.send_mail", "task_id": "t-1", "running_for": 2.5, "deadline_in": 5}
    return doc(
        [
            child(state="busy", task=task, in_flight=1),
            child(slot=2, pid=1002, phase="retiring", state="draining", rss=900),
        ]
    )


def test_live_view_ages_the_document() -> None:
    view = status.live_view(busy_doc(), now=NOW + 2)
    assert view["age"] == 2
    assert view["alive"] is True
    # A task's time stays as its last heartbeat said: it may have ended since.
    assert view["children"][0]["task"]["running_for"] == 2.5
    assert view["children"][0]["heartbeat_age"] == 2.4
    assert view["healthy"] is True


def test_the_table_is_aligned_and_shows_every_child() -> None:
    text = status.render_table(status.live_view(busy_doc(), now=NOW + 1))
    lines = text.splitlines()
    assert lines[0].startswith(f"ebsqs master {os.getpid()}: running, up 1h00m, 2 children")
    assert "healthy" in lines[1]
    header, first, second = lines[3:6]
    assert (
        " ".join(header.split())
        == "QUEUE # PID STATE TASK FOR DONE FAILED RETRIED ERRORS RESTARTS RSS LAST ERROR"
    )
    assert (
        " ".join(first.split())
        == "emails 1 1001 busy myapp.tasks.send_mail 2.5s 10 1 2 0 0 50.0M -"
    )
    assert "draining/retiring" in second
    assert second.split()[-2:] == ["900B", "-"]
    assert header.index("DONE") + len("DONE") == first.index(" 10 ") + len(" 10")


# -- commands -------------------------------------------------------------------------------


def write_now(path: Path, document: dict[str, Any]) -> Path:
    fresh = copy.deepcopy(document)
    fresh["written_at"] = time.time()
    status.write_status(path, fresh)
    return path


def test_status_command_prints_a_table_and_json(tmp_path: Path) -> None:
    path = write_now(tmp_path / "s.json", busy_doc())
    runner = CliRunner()
    table = runner.invoke(status_command, ["--status-file", str(path)])
    assert table.exit_code == 0, table.output
    assert "myapp.tasks.send_mail" in table.output
    as_json = runner.invoke(status_command, ["--status-file", str(path), "--json"])
    view = json.loads(as_json.output)
    assert [c["state"] for c in view["children"]] == ["busy", "draining"]
    assert view["healthy"] is True


def test_status_command_without_a_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(status_command, ["--status-file", str(tmp_path / "none.json")])
    assert result.exit_code == 1
    assert "is the supervisor running" in result.output


def test_healthcheck_command(tmp_path: Path) -> None:
    runner = CliRunner()
    path = write_now(tmp_path / "s.json", doc())
    healthy = runner.invoke(healthcheck, ["--status-file", str(path)])
    assert (healthy.exit_code, healthy.output) == (0, f"healthy: master {os.getpid()}\n")
    write_now(path, doc(create_time=1.0))
    dead = runner.invoke(healthcheck, ["--status-file", str(path)])
    assert dead.exit_code == 1
    assert dead.output.startswith("unhealthy: master") and "is not running" in dead.output
    missing = runner.invoke(healthcheck, ["--status-file", str(tmp_path / "none.json")])
    assert missing.exit_code == 1
    assert missing.output.startswith("unhealthy: no status file")


# -- damaged files --------------------------------------------------------------------------


def damaged(change: str) -> dict[str, Any]:
    """A sound document with one part broken, as ``change`` says."""
    document = busy_doc()
    if change == "no master pid":
        del document["master"]["pid"]
    elif change == "children not a list":
        document["children"] = {"emails": 1}
    elif change == "child without phase":
        del document["children"][1]["phase"]
    elif change == "task a string":
        document["children"][0]["task"] = "send_mail"
    elif change == "heartbeat age a string":
        document["children"][0]["heartbeat_age"] = "soon"
    elif change == "targets not counts":
        document["targets"] = {"emails": "one"}
    return document


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("no master pid", "master.pid is missing"),
        ("children not a list", "children has the wrong type (dict)"),
        ("child without phase", "children[1].phase is missing"),
        ("task a string", "children[0].task is not an object"),
        ("heartbeat age a string", "children[0].heartbeat_age has the wrong type (str)"),
        ("targets not counts", "targets must map queues to numbers of children"),
    ],
)
def test_a_damaged_status_file_is_one_line_error_for_status_and_healthcheck(
    tmp_path: Path, change: str, says: str
) -> None:
    path = write_now(tmp_path / "s.json", damaged(change))
    with pytest.raises(status.StatusError, match="damaged ebsqs status file"):
        status.read_status(path)
    runner = CliRunner()
    shown = runner.invoke(status_command, ["--status-file", str(path)])
    assert shown.exit_code == 1 and not isinstance(shown.exception, KeyError | TypeError)
    assert shown.output == f"Error: {path} is a damaged ebsqs status file: {says}\n"
    health = runner.invoke(healthcheck, ["--status-file", str(path)])
    assert health.exit_code == 1
    assert health.output == f"unhealthy: {path} is a damaged ebsqs status file: {says}\n"


def test_the_master_s_own_document_is_sound() -> None:
    broken = Counters(receive_errors=4, throttled=2, tasks={"t": TaskStats(succeeded=3)})
    snap = SupervisorSnapshot(
        pid=os.getpid(),
        state=MasterState.RUNNING,
        uptime=5.0,
        targets={"emails": 2},
        children=(snapshot_child(1, "busy", Counters()), snapshot_child(2, "degraded", broken)),
        queue_counts={"emails": broken},
        restarts=0,
        recycled=0,
    )
    document = status.document(snap, heartbeat_timeout=30.0, now=NOW)
    assert status.shape_problem(document) is None
    # The status document carries the degraded state and the error counters.
    assert document["degraded"] == 1
    assert [c["state"] for c in document["children"]] == ["busy", "degraded"]
    assert document["children"][1]["counts"]["receive_errors"] == 4
    assert document["counts"]["throttled"] == 2
    assert not status.check_health(document, now=NOW).ok


def snapshot_child(slot: int, state: str, counts: Counters) -> ChildSnapshot:
    return ChildSnapshot(
        queue="emails",
        slot=slot,
        pid=1000 + slot,
        phase=Phase.RUNNING,
        state=state,
        generation=0,
        uptime=5.0,
        heartbeat_age=0.2,
        in_flight=0,
        task=None,
        counts=counts,
        rss=0,
        restarts=0,
    )


# -- degraded children ----------------------------------------------------------------------

ERRORS = {"receive_errors": 12, "ack_errors": 1, "throttled": 7, "kms_errors": 0}


def degraded_doc() -> dict[str, Any]:
    sick = child(slot=2, pid=1002, state="degraded", counts={**child()["counts"], **ERRORS})
    document = doc([child(), sick])
    document["targets"] = {"emails": 2}
    document["counts"] = {**document["counts"], **ERRORS}
    return document


def test_a_degraded_child_is_unhealthy_with_its_error_counts() -> None:
    health = status.check_health(degraded_doc(), now=NOW)
    assert health == status.Health(
        False,
        "child emails #2 (pid 1002) is degraded: its receives keep failing "
        "(receive errors 12, ack errors 1, throttled 7, KMS errors 0)",
    )


def test_status_shows_degraded_children_and_broker_errors() -> None:
    view = status.live_view(degraded_doc(), now=NOW + 1)
    assert view["degraded"] == 1 and view["healthy"] is False
    lines = status.render_table(view).splitlines()
    assert "UNHEALTHY: child emails #2 (pid 1002) is degraded" in lines[1]
    assert lines[2] == "broker errors: receive errors 12, ack errors 1, throttled 7, KMS errors 0"
    rows = {line.split()[1]: line.split() for line in lines[5:]}
    header = lines[4].split()
    assert rows["2"][header.index("STATE")] == "degraded"
    assert rows["2"][header.index("ERRORS")] == "20"
    assert rows["1"][header.index("ERRORS")] == "0"


def test_healthcheck_fails_on_a_degraded_child(tmp_path: Path) -> None:
    path = write_now(tmp_path / "s.json", degraded_doc())
    result = CliRunner().invoke(healthcheck, ["--status-file", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith("unhealthy: child emails #2 (pid 1002) is degraded")


def test_no_broker_errors_line_while_there_are_none() -> None:
    lines = status.render_table(status.live_view(doc(), now=NOW)).splitlines()
    assert not any(line.startswith("broker errors") for line in lines)


# -- checking at start ------------------------------------------------------------------------


def test_probe_writable_leaves_nothing_behind(tmp_path: Path) -> None:
    status.probe_writable(tmp_path / "run" / "status.json")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert list((tmp_path / "run").iterdir()) == []
    status.probe_writable(tmp_path / "m.pid", create_directory=False)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_probe_writable_refuses_what_the_master_could_not_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError):
        status.probe_writable(blocker / "status.json")
    with pytest.raises(IsADirectoryError):
        status.probe_writable(tmp_path)
    with pytest.raises(FileNotFoundError):  # a pidfile's directory is not made for it
        status.probe_writable(tmp_path / "missing" / "m.pid", create_directory=False)


# -- queue depth, last errors, and a task's time as its heartbeat saw it ----------------------


def test_the_document_and_table_show_queue_and_dead_letter_depth() -> None:
    snap = SupervisorSnapshot(
        pid=os.getpid(),
        state=MasterState.RUNNING,
        uptime=5.0,
        targets={"emails": 1, "bulk": 1},
        children=(snapshot_child(1, "idle", Counters()),),
        queue_counts={"emails": Counters()},
        restarts=0,
        recycled=0,
    )
    depths = {
        "emails": QueueDepth("emails", 12, 3, 1, 4, sampled_at=NOW - 5),
        "bulk": QueueDepth("bulk", 0, 0, 0, None, sampled_at=NOW - 30, stale=True),
    }
    document = status.document(snap, heartbeat_timeout=30.0, now=NOW, depths=depths)
    assert status.shape_problem(document) is None
    assert document["queues"]["emails"] == {
        "visible": 12,
        "in_flight": 3,
        "delayed": 1,
        "dead_letters": 4,
        "sampled_at": NOW - 5,
        "stale": False,
    }
    text = status.render_table(status.live_view(document, now=NOW))
    [emails] = [line for line in text.splitlines() if line.startswith("queue emails:")]
    assert emails.startswith("queue emails: 12 waiting, 3 in flight, 1 delayed, 4 dead letters")
    [bulk] = [line for line in text.splitlines() if line.startswith("queue bulk:")]
    assert "no dead letters" in bulk and "stale" in bulk


def test_a_running_task_is_reported_as_its_last_heartbeat_saw_it() -> None:
    # A beat 0.9 s ago saw a task 0.01 s into its run (a 50 ms task, long done since):
    # the snapshot extrapolates, the status must not claim it ran for 0.91 s.
    task = CurrentTask("app.quick", "t-1", running_for=0.91, deadline_in=9.09)
    busy = dataclasses.replace(snapshot_child(1, "busy", Counters()), heartbeat_age=0.9, task=task)
    snap = SupervisorSnapshot(
        os.getpid(), MasterState.RUNNING, 5.0, {"emails": 1}, (busy,), {}, 0, 0
    )
    shown = status.document(snap, heartbeat_timeout=30.0, now=NOW)["children"][0]["task"]
    assert shown["running_for"] == 0.01
    assert shown["deadline_in"] == 9.09


def test_a_child_s_last_error_comes_from_the_counters_its_heartbeats_carry() -> None:
    table = Table(SupervisorConfig(apps=(), queues=(QueueSpec("emails", 1),)))
    [slot] = table.slots_to_fill(0.0)
    record = table.spawned(slot, 4242, 0.0, None)

    def beat(at: float, counters: Counters) -> None:
        wire = {"counts": counters.queue_wire(), "tasks": dict(counters.task_wire())}
        table.beat(record.pid, Beat(record.pid, "idle", **wire), at)  # type: ignore[arg-type]

    beat(1.0, Counters(tasks={"app.ok": TaskStats(succeeded=3)}))
    assert table.snapshot(1.0, 1, MasterState.RUNNING, 1.0).children[0].last_error is None
    beat(2.0, Counters(tasks={"app.ok": TaskStats(succeeded=3), "app.bad": TaskStats(failed=1)}))
    beat(3.0, Counters(tasks={"app.ok": TaskStats(succeeded=4), "app.bad": TaskStats(failed=1)}))
    child = table.snapshot(5.0, 1, MasterState.RUNNING, 5.0).children[0]
    assert (child.last_error, child.last_error_age) == ("failed: app.bad", 3.0)
    beat(6.0, Counters(receive_errors=2, tasks={"app.bad": TaskStats(failed=1)}))
    snap = table.snapshot(6.0, os.getpid(), MasterState.RUNNING, 6.0)
    assert snap.children[0].last_error == "receive_errors"
    document = status.document(snap, heartbeat_timeout=30.0, now=NOW)
    row = status.render_table(status.live_view(document, now=NOW)).splitlines()[-1]
    assert row.endswith("receive_errors (0.0s ago)")


def test_a_child_s_last_error_carries_the_error_s_own_text_from_its_heartbeat() -> None:
    table = Table(SupervisorConfig(apps=(), queues=(QueueSpec("emails", 1),)))
    [slot] = table.slots_to_fill(0.0)
    record = table.spawned(slot, 4242, 0.0, None)
    failed = Counters(tasks={"app.bad": TaskStats(failed=1)})
    wire = {"counts": failed.queue_wire(), "tasks": dict(failed.task_wire())}
    beat = Beat(record.pid, "idle", error="ValueError: no such address", **wire)  # type: ignore[arg-type]
    table.beat(record.pid, decode(encode(beat)[4:]), 1.0)  # through the wire
    snap = table.snapshot(2.0, os.getpid(), MasterState.RUNNING, 2.0)
    assert snap.children[0].last_error == "failed: app.bad (ValueError: no such address)"
    document = status.document(snap, heartbeat_timeout=30.0, now=NOW)
    row = status.render_table(status.live_view(document, now=NOW)).splitlines()[-1]
    assert "failed: app.bad (ValueError: no such address)" in row

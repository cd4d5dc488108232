"""The scheduler stepped by hand (no thread) with the host's state file on a memory broker, and
the refusal of a standard queue without the Django store, in-process and from ``supervise``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ebsqs.brokers import QueueSettings
from ebsqs.errors import ConfigurationError, ExitCode
from ebsqs.periodic.registry import Missed
from ebsqs.periodic.store import STATE_FILE, FileStore
from ebsqs.periodic.ticks import Tick
from ebsqs.supervisor.snapshot import MasterState, SupervisorSnapshot
from tests.integration.processes import run_ebsqs, sqlite_env
from tests.periodic.rig import Clock, Fleet, iso_seconds

pytestmark = pytest.mark.timeout(60)


def at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


T0 = 1_800_000_000.0  # a whole second: 2027-01-15T08:00:00Z


def test_two_schedulers_on_a_fifo_queue_send_copies_the_queue_collapses(tmp_path: Path) -> None:
    fleet = Fleet("ticks.fifo")
    clock = Clock(T0)
    one = fleet.scheduler(FileStore(tmp_path / "a" / STATE_FILE), clock)
    two = fleet.scheduler(FileStore(tmp_path / "b" / STATE_FILE), clock)
    for scheduler in (one, two):
        scheduler.start_plans()
    for second in range(1, 6):
        clock.now = T0 + second + 0.3
        one.run_once()
        two.run_once()
    # Each tick went out twice under one dedup id: the queue kept one copy of each.
    assert fleet.sent() == iso_seconds(T0 + 1, 5)
    state = json.loads((tmp_path / "b" / STATE_FILE).read_text())
    assert state == {"fleet.tick": iso_seconds(T0 + 5, 1)[0]}


@pytest.mark.parametrize(
    ("missed", "caught_up"),
    [("skip", 0), ("last", 1), ("all", 4)],
)
def test_a_restart_catches_up_on_ticks_missed_since_the_state_file(
    tmp_path: Path, missed: Missed, caught_up: int
) -> None:
    fleet = Fleet("ticks.fifo", missed=missed)
    store = FileStore(tmp_path / STATE_FILE)
    clock = Clock(T0)
    first = fleet.scheduler(store, clock)
    first.start_plans()
    clock.now = T0 + 1
    first.run_once()
    assert fleet.sent() == iso_seconds(T0 + 1, 1)
    # Down from T0 + 1.5 to T0 + 5.5: the ticks of seconds 2 to 5 fell while nothing ran.
    clock.now = T0 + 5.5
    with capture_logs() as logs:
        fleet.scheduler(store, clock).start_plans()
    assert fleet.sent() == iso_seconds(T0 + 6 - caught_up, caught_up)
    (missed_log,) = [log for log in logs if log["event"] == "periodic_ticks_missed"]
    assert missed_log["catching_up"] == caught_up


def test_a_failed_send_is_sent_again_on_the_next_pass(tmp_path: Path) -> None:
    fleet = Fleet("ticks.fifo")
    clock = Clock(T0)
    scheduler = fleet.scheduler(FileStore(tmp_path / STATE_FILE), clock)
    scheduler.start_plans()
    fleet.broker.delete_queue(fleet.queue)
    clock.now = T0 + 1.2
    with capture_logs() as logs:
        scheduler.run_once()
    (failed,) = [log for log in logs if log["event"] == "periodic_tick_failed"]
    assert failed["retrying"] is True and failed["error_type"] == "QueueDoesNotExist"
    assert FileStore(tmp_path / STATE_FILE).last("fleet.tick") is None  # not marked: not sent
    fleet.broker.ensure_queue(fleet.queue, QueueSettings(fifo=True))
    clock.now = T0 + 2.2
    scheduler.run_once()
    assert fleet.sent() == iso_seconds(T0 + 1, 2)


def test_masters_sharing_a_state_file_never_move_a_task_back(tmp_path: Path) -> None:
    one, two = FileStore(tmp_path / STATE_FILE), FileStore(tmp_path / STATE_FILE)
    later, earlier = Tick(at(T0 + 2), "t"), Tick(at(T0 + 1), "t")
    one.sent(later, at(T0 + 2))
    two.sent(earlier, at(T0 + 2))  # a slower master marks an older tick after
    assert two.last("t") == one.last("t") == at(T0 + 2)
    two.sent(Tick(at(T0 + 1), "u"), at(T0 + 2))
    assert (one.last("t"), one.last("u")) == (at(T0 + 2), at(T0 + 1))


def test_a_standard_queue_without_the_django_store_is_refused(tmp_path: Path) -> None:
    fleet = Fleet("ticks")
    scheduler = fleet.scheduler(FileStore(tmp_path / STATE_FILE), Clock(T0))
    snapshot = SupervisorSnapshot(1, MasterState.STARTING, 0.0, {}, (), {}, 0, 0)
    with capture_logs() as logs, pytest.raises(ConfigurationError, match="standard queue"):
        scheduler.on_starting(snapshot)
    (refused,) = [log for log in logs if log["event"] == "periodic_refused"]
    assert "FIFO queue" in refused["fix"] and "ebsqs.contrib.django" in refused["fix"]


def test_supervise_refuses_to_start_with_a_periodic_task_on_a_standard_queue(
    tmp_path: Path,
) -> None:
    env = sqlite_env(tmp_path / "broker.db", EBSQS_DEFAULT_QUEUE="plain", EBSQS_TEST_LEDGER="-")
    done = run_ebsqs(
        "supervise", "--app", "tests.fixtures.periodic_tasks", "--queues", "plain",
        "--workers", "1", "--log-format", "json", "--status-file", str(tmp_path / "s.json"),
        env=env, timeout=30,
    )  # fmt: skip
    assert done.returncode == ExitCode.BOOT, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert '"periodic_refused"' in output and "FIFO queue" in output
    assert '"child_spawned"' not in output  # refused before the first fork
    assert '"master_boot_failed"' in output and '"exit_code": 0' not in output

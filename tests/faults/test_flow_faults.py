"""A concurrency limit across a real supervisor's 4 children, one of them killed while it holds
the only slot: the slot is not leaked (the host store frees a dead holder's lease at once), the
tasks never overlap, and every one finishes (again only if the killed process had finished it
and its delete was still waiting)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from tests.faults.harness import EbsqsProcess, Rig, keys
from tests.fixtures import flow_tasks
from tests.fixtures.ledger_tasks import CRASH_ENV

pytestmark = pytest.mark.timeout(60)

TASKS = 6


def spans(path: Path) -> list[tuple[float, float]]:
    """(start, finish) of each run that finished, by process and key."""
    opened: dict[tuple[str, str], float] = {}
    closed = []
    for line in path.read_text().splitlines():
        event, pid, key, at = line.split()
        if event == "start":
            opened[(pid, key)] = float(at)
        else:
            closed.append((opened.pop((pid, key)), float(at)))
    return sorted(closed)


def test_a_killed_holder_does_not_keep_the_slot(rig: Rig, fauxqs_server: str) -> None:
    rig.create(visibility=5, max_receive_count=10)
    process = EbsqsProcess(
        "supervise",
        [
            *("--app", "tests.fixtures.flow_tasks", "--queues", f"{rig.queue}:4"),
            *("--wait", "1", "--visibility-timeout", "5"),
        ],
        rig.env(
            fauxqs_server,
            EBSQS_FLOW_STORE="host",
            EBSQS_FLOW_HOST_STORE=str(rig.tmp_path / "host.sqlite3"),
            **{CRASH_ENV: "before_run:k0001"},
        ),
        rig.tmp_path / "supervise.log",
    )
    rig.started.append(process)
    began = time.monotonic()
    rig.send(keys("k", TASKS), task=flow_tasks.single, seconds=0.3)
    rig.wait_settled(timeout=40)
    took = time.monotonic() - began
    assert not rig.lost() and rig.dead_letters.keys() == set(), rig.describe()
    assert rig.ledger.started()["k0001"] == 2  # killed once while it held the slot, then ran
    # At-least-once: what the killed process finished in its last ack_wait may run again (its
    # delete was waiting to fill a batch); nothing else may.
    killed = next(e.pid for e in rig.ledger.entries("start") if e.key == "k0001")
    finished_there = {e.key for e in rig.ledger.entries("finish") if e.pid == killed}
    assert set(rig.ledger.duplicates()) <= finished_there, rig.describe()
    runs = spans(Path(f"{rig.ledger.path}.spans"))
    assert len(runs) == TASKS + rig.ledger.extra_runs()
    for (_, finish), (start, _) in itertools.pairwise(runs):
        assert start >= finish, f"two ran at once: {runs}"
    # A leaked slot would hold every other task back for the lease's minute.
    assert took < 30, rig.describe()

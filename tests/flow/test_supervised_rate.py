"""Acceptance: a real ``ebsqs supervise`` with 4 children on fauxqs, a 10/s limit, 200 tasks.

The children share the limit through the store (the host store's SQLite file, or Redis). The
ledger the tasks write is the only evidence: the observed rate (first to last start) is within
10 % of 10/s, every task ran exactly once, none was lost or dead-lettered. The log says how many
deferrals (so receives) the limit cost.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.faults.harness import EbsqsProcess, Rig, keys
from tests.fixtures import flow_tasks
from tests.flow.conftest import REDIS_URL, needs_redis

pytestmark = pytest.mark.timeout(90)

TASKS = 200
RATE = 10.0


def run_at_the_limit(rig: Rig, endpoint: str, store: str) -> dict[str, float]:
    """Send 200 paced tasks to a 4-child ``ebsqs supervise``; return what was measured."""
    rig.create(visibility=30, max_receive_count=10)
    process = EbsqsProcess(
        "supervise",
        ["--app", "tests.fixtures.flow_tasks", "--queues", f"{rig.queue}:4", "--wait", "1"],
        rig.env(endpoint, EBSQS_FLOW_STORE=store),
        rig.tmp_path / "supervise.log",
    )
    rig.started.append(process)
    return measure(rig, process.log_path)


def measure(rig: Rig, log: Path) -> dict[str, float]:
    """Send 200 paced tasks to the running supervisor, wait until all settled; the observed
    rate (first to last start), the busiest second and the receives per task (its log)."""
    rig.send(keys("k", TASKS), task=flow_tasks.paced, run=uuid.uuid4().hex)
    rig.wait_settled(timeout=60)
    starts = sorted(
        float(line.split()[1]) for line in Path(f"{rig.ledger.path}.times").read_text().splitlines()
    )
    busiest = max(sum(1 for t in starts[i:] if t < start + 1.0) for i, start in enumerate(starts))
    deferred = 0
    for line in log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "task_deferred":
            deferred += 1
    return {
        "rate": (len(starts) - 1) / (starts[-1] - starts[0]),
        "busiest_second": busiest,
        "receives_per_task": (TASKS + deferred) / TASKS,
    }


def judge(rig: Rig, seen: dict[str, float]) -> None:
    assert not rig.lost(), rig.describe()
    assert rig.ledger.duplicates() == {}, rig.describe()
    assert rig.dead_letters.keys() == set(), rig.describe()
    assert len(rig.ledger.entries("start")) == TASKS
    assert RATE * 0.9 <= seen["rate"] <= RATE * 1.1, seen
    # Turns are whole-second releases: the turns of one second come back together, and a busy
    # machine can run two or three such seconds' worth in one (20 was seen in CI); a herd would
    # start most of the 200 at once.
    assert seen["busiest_second"] <= 3 * RATE, seen
    assert seen["receives_per_task"] < 2.5, seen


def test_the_host_store_holds_four_children_to_ten_a_second(
    rig: Rig,
    fauxqs_server: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = run_at_the_limit(rig, fauxqs_server, f"sqlite:///{rig.tmp_path / 'flow.sqlite3'}")
    with capsys.disabled():
        print(f"\nhost store: {seen}")
    judge(rig, seen)


@needs_redis
def test_redis_holds_four_children_to_ten_a_second(
    rig: Rig,
    fauxqs_server: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = run_at_the_limit(rig, fauxqs_server, REDIS_URL)
    with capsys.disabled():
        print(f"\nredis store: {seen}")
    judge(rig, seen)

"""FIFO queues end to end: real ``ebsqs supervise`` processes on a fauxqs FIFO queue.

Judged on the ledger the tasks write and on the FIFO dead-letter queue, never on counters.
Messages are sent with the real producer (``send_with(group_id=...)``), straight to fauxqs;
the workers talk through the chaos proxy (which injects nothing here).
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Sequence

import pytest

from tests.faults.harness import NOOP, POISON, Rig, keys
from tests.faults.ledger import Entry
from tests.waiting import wait_until

pytestmark = [pytest.mark.fauxqs, pytest.mark.fifo]


def assert_in_order(entries: Sequence[Entry], group: Sequence[str], poison: str = "") -> None:
    """Each key of ``group`` first starts after the key before it ended (its ``finish``, or
    for ``poison`` its last ``start``): one at a time, in send order."""
    position: dict[tuple[str, str], int] = {}
    first_start: dict[str, int] = {}
    for index, entry in enumerate(entries):
        position[(entry.event, entry.key)] = index  # the last line of each kind
        if entry.event == "start":
            first_start.setdefault(entry.key, index)
    for before, after in itertools.pairwise(group):
        ended = position[("start" if before == poison else "finish", before)]
        assert first_start[after] > ended, (
            f"{after} started (line {first_start[after]}) before {before} ended (line {ended})"
        )


@pytest.mark.timeout(150)
def test_groups_keep_order_a_poison_blocks_only_its_group_and_dedup_ids_hold(rig: Rig) -> None:
    rig.create(visibility=30)
    group_a = keys("a", 50)
    group_b = keys("b", 50)
    to_a = NOOP.send_with(queue_name=rig.queue, group_id="A")
    to_b = NOOP.send_with(queue_name=rig.queue, group_id="B")
    # A: ten, then a poison message that fails every time, then forty more behind it.
    to_a.delay_many([(key,) for key in group_a[:10]])
    POISON.send_with(queue_name=rig.queue, group_id="A").delay("a-poison")
    to_a.delay_many([(key,) for key in group_a[10:]])
    to_b.delay_many([(key,) for key in group_b])
    # The second send reuses the first's deduplication id within five minutes: SQS drops it.
    once = NOOP.send_with(queue_name=rig.queue, group_id="B", deduplication_id="b-once")
    once.delay("b-dup1")
    once.delay("b-dup2")
    rig.sent += [*group_a, "a-poison", *group_b, "b-dup1"]

    # Two children, each running up to four tasks at once: groups still go one at a time.
    rig.start("supervise", "--workers", "2", "--executor", "thread", "--concurrency", "4")
    rig.wait_settled(timeout=120)
    entries = rig.ledger.entries()
    poison_starts = [e for e in entries if e.key == "a-poison" and e.event == "start"]
    letter = rig.dead_letters.by_key()["a-poison"]

    order_a = [*group_a[:10], "a-poison", *group_a[10:]]
    assert_in_order(entries, order_a, poison="a-poison")
    assert_in_order(entries, group_b)
    finished = rig.ledger.finished()
    assert {key: n for key, n in finished.items() if n != 1} == {}, "a key ran twice"
    assert set(finished) == {*group_a, *group_b, "b-dup1"}, "b-dup2 ran, or a key is missing"
    # max_retries=2: exactly three runs, attempts counted 1, 2, 3 from the receive count.
    assert [e.attempt for e in poison_starts] == [1, 2, 3]
    assert letter.attributes["ebsqs-reason"] == "retries exhausted"
    assert letter.attributes["ebsqs-attempts"] == "3"
    assert letter.attributes["ebsqs-error-type"].endswith("Poison")
    assert letter.group_id == "A"


@pytest.mark.timeout(120)
def test_a_killed_child_reruns_only_its_message_and_the_group_stays_in_order(rig: Rig) -> None:
    rig.create(visibility=2)
    group = keys("k", 20)
    NOOP.send_with(queue_name=rig.queue, group_id="G").delay_many([(key,) for key in group])
    rig.sent += group
    victim = group[5]

    master = rig.start(
        "supervise",
        "--workers",
        "1",
        "--visibility-timeout",
        "2",
        EBSQS_TEST_CRASH=f"after_run:{victim}",
    )
    rig.wait_settled(timeout=90)
    wait_until(lambda: rig.ledger.finished()[victim] == 2, 30, message=rig.describe)
    master.signal(signal.SIGTERM)
    assert master.process.wait(30) == 0

    entries = rig.ledger.entries()
    finished = rig.ledger.finished()
    # The killed child had finished the victim but not deleted it: it runs once more, first.
    assert finished[victim] == 2
    assert {key: n for key, n in finished.items() if key != victim and n != 1} == {}
    assert_in_order(entries, group)

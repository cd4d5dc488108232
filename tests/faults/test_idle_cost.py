"""Idle children of a queue share one long poll (the poll token), and a backlog wakes them all.

Counted on the wire, at the chaos proxy: each idle child long-polling would cost a receive per
``--wait`` each; with the token only its holder polls, whatever the number of children, and a
holder that receives messages hands the token on at once, so its siblings join in.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.harness import SLEEP, Rig, keys
from tests.waiting import wait_until

CHILDREN = 4
#: Seconds the idle supervisor is watched (its polls last ``--wait 1`` second).
WINDOW = 6.0


@pytest.mark.timeout(90)
def test_idle_children_share_one_long_poll_and_a_backlog_wakes_them_all(rig: Rig) -> None:
    rig.create()
    sup = rig.start("supervise", "--workers", str(CHILDREN))
    wait_until(lambda: len(sup.children()) == CHILDREN, 15, message=rig.describe)
    wait_until(lambda: sup.events("supervisor_ready"), 15, message=rig.describe)

    before = rig.proxy.requests["ReceiveMessage"]
    time.sleep(WINDOW)  # a measuring window, not a synchronisation: the rate is the result
    polls = rig.proxy.requests["ReceiveMessage"] - before
    # One poller: about one receive a second. Every child polling would make about four.
    assert WINDOW / 2 <= polls <= WINDOW * 1.5 + 2, (polls, rig.describe())

    rig.send(keys("b", 200), task=SLEEP, seconds=0.05)  # 10 s of work for one child
    rig.wait_settled(40)
    assert not rig.lost()
    runners = {entry.pid for entry in rig.ledger.entries("finish")}
    assert len(runners) == CHILDREN, f"only {len(runners)} children woke: {rig.describe()}"
    assert not rig.ledger.duplicates(), rig.describe()

    sup.signal(signal.SIGTERM)
    assert sup.wait(30) == 0, rig.describe()

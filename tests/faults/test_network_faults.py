"""Network faults between real ``ebsqs`` processes and fauxqs, made by the chaos proxy:
throttled and failing receives, an endpoint outage, lost acks. Judged on the ledger and the
dead-letter queue only (see ``tests/faults/ledger.py``).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ebsqs.brokers.sqs import SQSBroker
from ebsqs.errors import BrokerUnavailable
from ebsqs.ops.status import StatusError, check_health, read_status
from tests.faults.harness import BATCH, SLEEP, Rig, keys
from tests.faults.proxy import INTERNAL_ERROR, KMS_THROTTLED, OVER_LIMIT, THROTTLED, SqsError
from tests.integration.processes import run_ebsqs
from tests.waiting import wait_until

pytestmark = pytest.mark.fauxqs


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "error", [THROTTLED, OVER_LIMIT, KMS_THROTTLED, INTERNAL_ERROR], ids=lambda e: e.code
)
def test_failing_receives_lose_nothing(rig: Rig, error: SqsError) -> None:
    rig.create()
    sup = rig.start("supervise", "--workers", "2")
    wait_until(lambda: len(sup.children()) == 2, 15, message=rig.describe)
    # Half of all receives fail for four seconds, while the work arrives.
    rig.proxy.inject("ReceiveMessage", error, rate=0.5, seconds=4)
    rig.send(keys("t", 150), task=SLEEP, seconds=0.01)
    rig.wait_settled(25)

    assert rig.proxy.faulted["ReceiveMessage"] > 0, "the fault never fired"
    assert not rig.lost()
    assert not rig.ledger.duplicates(), "a failed receive made a message run twice"
    assert not rig.dead_letters.keys()
    assert len(sup.children()) == 2, "a child died of a failing receive"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("outage", ["blackhole", "refuse"])
def test_an_endpoint_outage_loses_nothing_and_work_resumes(rig: Rig, outage: str) -> None:
    rig.create()
    sup = rig.start("supervise", "--workers", "2", "--visibility-timeout", "10")
    wait_until(lambda: len(sup.children()) == 2, 15, message=rig.describe)
    rig.send(keys("o", 120), task=SLEEP, seconds=0.05)
    rig.wait_finished(20, 15)

    getattr(rig.proxy, outage)(4)
    wait_until(lambda: not rig.proxy.down(), 10)
    finished_at_restore = len(rig.ledger.entries("finish"))
    assert finished_at_restore < len(rig.sent), "the outage came too late to matter"

    rig.wait_settled(30)
    assert not rig.lost()
    assert len(rig.ledger.entries("finish")) > finished_at_restore, "work did not resume"
    # A delete lost in the outage repeats its batch, no more.
    assert rig.ledger.extra_runs() <= 2 * BATCH, rig.describe()


@pytest.mark.timeout(60)
def test_heartbeats_keep_flowing_through_a_network_blackhole(rig: Rig) -> None:
    """Busy children are not killed for silence while the keeper's requests hang (16.2)."""
    rig.create()
    sup = rig.start(
        "supervise", "--workers", "2", "--heartbeat-timeout", "3", "--visibility-timeout", "2"
    )
    wait_until(lambda: len(sup.children()) == 2, 15, message=rig.describe)
    children = set(sup.children())
    rig.send(["hb0"], task=SLEEP, seconds=6)
    rig.send(["hb1"], task=SLEEP, seconds=6)
    wait_until(lambda: len(rig.ledger.started()) == 2, 15, message=rig.describe)

    # The keeper extends each 2-second visibility about every second: through a 4.5-second
    # blackhole, every one of those requests hangs.
    rig.proxy.blackhole(4.5)
    rig.wait_settled(30)
    assert not sup.events("child_killed"), rig.describe()
    assert set(sup.children()) == children
    assert rig.ledger.finished() == {"hb0": 1, "hb1": 1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forward", [False, True], ids=["ack-lost-on-the-way", "answer-lost"])
def test_lost_acks_repeat_work_and_lose_nothing(rig: Rig, forward: bool) -> None:
    """Deletes whose answer never arrives.

    ``ack-lost-on-the-way``: the request never reaches the server, through every botocore
    retry for five seconds, so the messages come back after their 2-second visibility and run
    again, each extra run in the ledger. ``answer-lost``: the server deleted them and the client
    never heard; its retries find them gone. Either way nothing is lost.
    """
    rig.create()
    worker = rig.start("worker", "--visibility-timeout", "2")
    # The window opens once the worker is up (a slow start must not use it up), just before
    # the work arrives.
    wait_until(lambda: worker.events("worker_started"), 15, message=rig.describe)
    rig.proxy.drop("DeleteMessageBatch", forward=forward, seconds=5)
    rig.send(keys("a", 10))
    rig.wait_settled(25)
    # The finish lines come before the deletes: wait for the first delete to meet the fault.
    wait_until(lambda: rig.proxy.faulted["DeleteMessageBatch"] > 0, 10, message=rig.describe)
    if not forward:
        wait_until(
            lambda: all(count >= 2 for count in rig.ledger.finished().values()),
            20,
            message=rig.describe,
        )
        assert set(rig.ledger.duplicates()) == set(rig.sent)
    assert not rig.lost() and not rig.dead_letters.keys()
    assert worker.process.poll() is None, rig.describe()


ACCESS_DENIED = SqsError("AccessDenied", "AccessDenied", 403)


@pytest.mark.timeout(60)
def test_access_denied_at_boot_stops_the_master(rig: Rig) -> None:
    """Issue item 16.7: refused credentials are a boot error (exit 3), not a restart loop."""
    rig.create()
    rig.proxy.inject(None, ACCESS_DENIED)
    sup = rig.start("supervise", "--workers", "2")
    assert sup.wait(30) == 3, rig.describe()
    assert rig.proxy.faulted, "the supervisor never asked SQS anything"
    assert "AccessDenied" in sup.output()
    assert len(sup.events("child_spawned")) <= 2 * 2, "children were restarted in a loop"


def healthy(status_file: Path) -> bool:
    """The master's status file judged as ``ebsqs healthcheck`` judges it (in-process: fast)."""
    try:
        return check_health(read_status(status_file)).ok
    except StatusError:
        return False  # not written yet


def healthcheck(rig: Rig, status_file: Path) -> subprocess.CompletedProcess[str]:
    return run_ebsqs("healthcheck", "--status-file", str(status_file), env=rig.env())


@pytest.mark.timeout(60)
def test_a_worker_whose_receives_all_fail_is_reported_unhealthy(rig: Rig) -> None:
    """Issue item 16.8: while every receive fails, status says so and healthcheck fails; once
    they succeed again it is healthy."""
    rig.create()
    status_file = rig.tmp_path / "status.json"
    sup = rig.start("supervise", "--workers", "1", "--status-file", str(status_file))
    wait_until(lambda: healthy(status_file), 20, message=rig.describe)
    assert healthcheck(rig, status_file).returncode == 0

    rig.proxy.inject("ReceiveMessage", OVER_LIMIT)
    wait_until(lambda: not healthy(status_file), 20, message=sup.describe)
    checked = healthcheck(rig, status_file)
    status = run_ebsqs("status", "--status-file", str(status_file), env=rig.env())
    rig.proxy.clear()  # before the receive backoff grows long
    assert checked.returncode != 0, checked.stdout
    assert "degraded" in status.stdout, status.stdout

    wait_until(lambda: healthy(status_file), 20, message=sup.describe)
    rig.send(keys("h", 5))
    rig.wait_settled(15)


def dead_receipts(request: dict[str, Any]) -> dict[str, Any]:
    """SQS's answer to a visibility change for a message received anew since."""
    failed = [
        {
            "Id": entry["Id"],
            "Code": "ReceiptHandleIsInvalid",
            "SenderFault": True,
            "Message": "The receipt handle has expired.",
        }
        for entry in request["Entries"]
    ]
    return {"Successful": [], "Failed": failed}


@pytest.mark.timeout(60)
def test_a_dead_receipt_is_not_extended_again(rig: Rig) -> None:
    """Issue item 16.9: after ``ReceiptHandleIsInvalid`` the keeper stops extending that
    message and says so once; the task still finishes."""
    rig.create()
    rig.proxy.answer("ChangeMessageVisibilityBatch", dead_receipts)
    sup = rig.start("supervise", "--workers", "1", "--visibility-timeout", "2")
    rig.send(["dead"], task=SLEEP, seconds=3)
    rig.wait_settled(20)

    assert rig.proxy.faulted["ChangeMessageVisibilityBatch"] == 1, rig.describe()
    assert len(sup.events("message_visibility_lost")) == 1
    assert rig.ledger.finished()["dead"] >= 1 and not rig.lost()


@pytest.mark.timeout(30)
def test_kms_throttling_reads_as_a_throttle(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A throttle is a throttle whichever protocol's name it comes under (issue item 16.8)."""
    rig.create()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", rig.proxy.endpoint)
    through_proxy = SQSBroker()
    try:
        through_proxy.receive(rig.queue, 1, wait_seconds=0)  # the queue URL, before the fault
        rig.proxy.inject("ReceiveMessage", KMS_THROTTLED)
        with pytest.raises(BrokerUnavailable, match="KMS"):
            through_proxy.receive(rig.queue, 1, wait_seconds=0)
    finally:
        through_proxy.close()


@pytest.mark.timeout(60)
def test_deletes_and_visibility_changes_give_up_within_seconds_in_a_blackhole(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16.2: the keeper's requests have short timeouts of their own, so a blackhole holds
    its thread about ten seconds, not the three minutes of six 30-second reads; and they work
    again the moment the network is back."""
    rig.create()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", rig.proxy.endpoint)
    through_proxy = SQSBroker()
    rig.send(keys("b", 4))
    held = through_proxy.receive(rig.queue, 4, 1, visibility_timeout=30)
    assert len(held) == 4
    rig.proxy.blackhole(40)
    # Deletes go through the same client (SQSBroker.settle_client): one call shows both.
    started = time.monotonic()
    try:
        failed = through_proxy.change_visibility(held[:2], 30)
    except BrokerUnavailable:
        failed = {"all": "unavailable"}
    elapsed = time.monotonic() - started
    assert failed, "a visibility change succeeded through a blackhole"
    assert elapsed < 15, f"a visibility change held its thread {elapsed:.1f} s"
    rig.proxy.clear()
    assert through_proxy.ack(held) == {}  # the network is back: all four go
    through_proxy.close()

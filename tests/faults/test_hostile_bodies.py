"""Hostile bodies received among valid ones (issue items 10.10 and 16.1): each is dead-lettered
with its reason, every valid message of the same batch runs once, and no child crashes.
"""

from __future__ import annotations

import json

import pytest

from ebsqs.brokers import OutgoingMessage
from ebsqs.envelope import Envelope, encode
from tests.faults.harness import NOOP, POISON, Rig
from tests.waiting import wait_until

pytestmark = pytest.mark.fauxqs


def _valid(key: str) -> str:
    return encode(Envelope(task=NOOP.name, args=(key,)))


def _with(key: str, **fields: object) -> str:
    """A valid body of ``key`` with ``fields`` replaced (as raw JSON text)."""
    payload = json.loads(_valid(key))
    body = json.dumps({**payload, **{name: f"@{name}@" for name in fields}})
    for name, raw in fields.items():
        body = body.replace(f'"@{name}@"', str(raw))
    return body


#: Bodies that must each become one dead letter with a reason: deep nesting (RecursionError in
#: a recursive parser), numbers beyond a float or an int (OverflowError, ValueError), not JSON.
HOSTILE = {
    "nested": "[" * 100_000 + "]" * 100_000,
    "huge-due": _with("huge-due", due="1e999"),
    "huge-attempt": _with("huge-attempt", attempt="9" * 5000),
    "not-json": "{not json",
}


@pytest.mark.timeout(60)
def test_each_hostile_body_is_dead_lettered_and_its_batch_runs(rig: Rig) -> None:
    rig.create()
    valid = [f"v{i}" for i in range(10 - len(HOSTILE))]
    bodies = [_valid(key) for key in valid] + list(HOSTILE.values())
    rig.broker.send_batch(rig.queue, [OutgoingMessage(body) for body in bodies])
    sup = rig.start("supervise", "--workers", "1", "--visibility-timeout", "3")

    def all_letters() -> bool:
        return len(rig.dead_letters.poll()) >= len(HOSTILE)

    wait_until(lambda: set(rig.ledger.finished()) >= set(valid), 20, message=rig.describe)
    wait_until(all_letters, 20, message=rig.describe)
    assert rig.ledger.finished() == {key: 1 for key in valid}
    letters = list(rig.dead_letters.letters.values())
    assert sorted(letter.body for letter in letters) == sorted(HOSTILE.values())
    assert all(letter.attributes.get("ebsqs-reason") for letter in letters)
    assert not sup.events("child_exited"), "a hostile body crashed a child"


@pytest.mark.timeout(60)
def test_a_body_larger_than_256_kib_that_sqs_accepted_can_be_dead_lettered(rig: Rig) -> None:
    """Issue item 16.6: a queue whose ``MaximumMessageSize`` is 1 MiB accepts 600 KB bodies;
    a failing one runs its three attempts and reaches the dead-letter queue, never looping."""
    rig.create(max_receive_count=100)  # the redrive policy must not do ebsqs's work
    client = rig.broker.client
    for name in (rig.queue, f"{rig.queue}-dlq"):
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
        client.set_queue_attributes(QueueUrl=url, Attributes={"MaximumMessageSize": "1048576"})
    body = encode(Envelope(task=POISON.name, args=("big", "x" * 600_000), max_retries=2))
    client.send_message(
        QueueUrl=client.get_queue_url(QueueName=rig.queue)["QueueUrl"], MessageBody=body
    )
    sup = rig.start("supervise", "--workers", "1", "--visibility-timeout", "3")

    wait_until(lambda: rig.dead_letters.keys() == {"big"}, 10, message=rig.describe)
    assert [e.attempt for e in rig.ledger.entries("start")] == [1, 2, 3]
    assert not sup.events("dead_letter_failed")

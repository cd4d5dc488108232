"""Large payloads through a real ``ebsqs worker`` process, on fauxqs's SQS and S3.

The producer is this process's ``.delay()`` (or AWS's SQS Extended Client); the worker is a
subprocess. What ran is read from the tasks' record file; what is left in S3 from the bucket.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from ebsqs.envelope import Envelope, encode
from ebsqs.payload import POINTER_CLASS
from tests.fixtures import worker_tasks
from tests.integration.processes import Backend
from tests.integration.test_large_payloads import extended_client
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.fauxqs,
    pytest.mark.timeout(90),
    pytest.mark.parametrize("backend", ["fauxqs"], indirect=True),
]


@pytest.fixture
def bucket(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket, named to this process's producer and to the workers it starts."""
    name = f"ebsqs-e2e-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    monkeypatch.setenv("EBSQS_LARGE_PAYLOAD_BUCKET", name)
    backend.env["EBSQS_LARGE_PAYLOAD_BUCKET"] = name
    yield name


def objects(bucket: str) -> list[str]:
    listed = boto3.session.Session().client("s3").list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_a_3_mb_argument_runs_and_its_object_is_deleted_after_the_ack(
    backend: Backend, bucket: str, unique_queue: Any
) -> None:
    queue = unique_queue()
    backend.create(queue)
    worker_tasks.record_size.send_with(queue_name=queue).delay("big", "x" * 3_000_000)
    assert len(objects(bucket)) == 1  # over the queue's 1 MiB: it went through S3
    with backend.worker(queue):
        wait_until(lambda: backend.executions() == ["big 3000000"], 30)
        wait_until(lambda: objects(bucket) == [], 15, message=lambda: f"left: {objects(bucket)}")


def test_a_large_dead_letter_keeps_its_object_and_retries_leave_none_behind(
    backend: Backend, bucket: str, unique_queue: Any
) -> None:
    queue = unique_queue()
    backend.create(queue)
    worker_tasks.large_fails.send_with(queue_name=queue).delay("doomed", "y" * 2_000_000)
    dlq = backend.dead_letter_queue(queue)
    with backend.worker(queue):
        letters = wait_until(lambda: backend.broker.receive(dlq, 10, 0), 30)
    assert backend.executions() == [
        "doomed attempt=1 size=2000000",
        "doomed attempt=2 size=2000000",
    ]
    [letter] = letters
    kind, pointer = json.loads(letter.body)
    assert kind == POINTER_CLASS
    # The first attempt's object went with its message; the dead letter points to the second.
    wait_until(
        lambda: objects(bucket) == [pointer["s3Key"]], 15, message=lambda: str(objects(bucket))
    )
    assert letter.attributes["ebsqs-reason"] == "retries exhausted"
    assert int(letter.attributes["ExtendedPayloadSize"]) > 2_000_000


def test_a_message_the_extended_client_offloaded_runs_on_an_ebsqs_worker(
    backend: Backend, bucket: str, unique_queue: Any
) -> None:
    queue = unique_queue()
    backend.create(queue)
    client = extended_client(bucket)
    url = client.get_queue_url(QueueName=queue)["QueueUrl"]
    body = encode(Envelope(task=worker_tasks.record_size.name, args=("ext", "z" * 400_000)))
    client.send_message(QueueUrl=url, MessageBody=body)
    assert len(objects(bucket)) == 1
    with backend.worker(queue):
        wait_until(lambda: backend.executions() == ["ext 400000"], 30)
        wait_until(lambda: objects(bucket) == [], 15)

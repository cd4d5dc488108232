"""Large payloads end to end: ebsqs.payload against fauxqs's SQS and S3, with real boto3 clients,
and against AWS's own SQS Extended Client (the ``amazon-sqs-extended-client`` package) on the
other side of the queue, both ways.

Messages are sent and received with a plain boto3 SQS client, as the wire carries them
(``ExtendedPayloadSize`` as an SQS ``Number``), so these tests fix the format, not a broker.

The Extended Client comes from :func:`tests.extended.session_class`, which undoes what its import
does to boto3 for the whole process.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from ebsqs.brokers.base import WORKER_ATTRIBUTES, BodyLimit, ReceivedMessage
from ebsqs.config import Settings
from ebsqs.errors import EnvelopeError
from ebsqs.payload import (
    DIGEST_ATTRIBUTE,
    LEGACY_POINTER_CLASS,
    LEGACY_SIZE_ATTRIBUTE,
    POINTER_CLASS,
    SIZE_ATTRIBUTE,
    Packed,
    PayloadError,
    Payloads,
    PayloadUnavailable,
)
from tests import servers
from tests.extended import session_class

pytestmark = [pytest.mark.fauxqs, pytest.mark.timeout(60)]

#: The Extended Client offloads bodies over 256 KiB (its fixed threshold).
OVER_EXTENDED_THRESHOLD = 300 * 1024


@pytest.fixture
def env(fauxqs_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    servers.apply_sqs_env(monkeypatch, fauxqs_server)
    return fauxqs_server


@pytest.fixture
def s3(env: str) -> Any:
    return boto3.session.Session().client("s3")


@pytest.fixture
def sqs(env: str) -> Any:
    return boto3.session.Session().client("sqs")


def new_bucket(s3: Any) -> str:
    name = f"ebsqs-it-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(s3: Any) -> str:
    return new_bucket(s3)


@pytest.fixture
def queue(sqs: Any, unique_queue: Any) -> tuple[str, str]:
    """A fresh queue: (name, URL)."""
    name = unique_queue()
    return name, sqs.create_queue(QueueName=name)["QueueUrl"]


@pytest.fixture
def payloads(bucket: str) -> Iterator[Payloads]:
    made = Payloads(Settings().replace(large_payload_bucket=bucket))
    yield made
    made.close()


def extended_client(bucket: str) -> Any:
    """AWS's Extended Client: a boto3 SQS client patched to offload to ``bucket``."""
    session = session_class()(region_name=servers.REGION)
    client: Any = session.client("sqs")
    client.large_payload_support = bucket
    assert not hasattr(boto3.session.Session().client("sqs"), "large_payload_support")
    return client


@pytest.fixture
def extended(env: str, bucket: str) -> Any:
    return extended_client(bucket)


def body_limit(sqs: Any, name: str, url: str) -> BodyLimit:
    """The queue's limit as the producer reads it: its MaximumMessageSize."""
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["MaximumMessageSize"])
    size = int(attributes["Attributes"]["MaximumMessageSize"])
    return BodyLimit(size, f"queue {name!r}'s MaximumMessageSize")


def send(sqs: Any, url: str, packed: Packed) -> None:
    """Send a packed body with its attributes typed as SQS types them (int: Number)."""
    attributes = {
        name: {
            "DataType": "Number" if isinstance(value, int) else "String",
            "StringValue": str(value),
        }
        for name, value in packed.attributes.items()
    }
    sqs.send_message(QueueUrl=url, MessageBody=packed.body, MessageAttributes=attributes)


def receive(sqs: Any, name: str, url: str, timeout: float = 10.0) -> ReceivedMessage:
    """One message, asking for exactly the attributes a worker's receive asks for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=1,
            MessageAttributeNames=list(WORKER_ATTRIBUTES),
        )
        for raw in response.get("Messages", []):
            return ReceivedMessage(
                queue=name,
                message_id=raw["MessageId"],
                receipt=raw["ReceiptHandle"],
                body=raw["Body"],
                attributes={
                    key: value["StringValue"]
                    for key, value in raw.get("MessageAttributes", {}).items()
                },
            )
    raise AssertionError(f"no message on {name} after {timeout} s")


def big_body(size: int) -> str:
    """An envelope-like body of about ``size`` bytes, with non-ASCII text in it."""
    unit = "Grüße, €uro — "
    return '{"v":1,"task":"app.report","args":["' + unit * (size // len(unit.encode())) + '"]}'


def test_a_3_mb_body_goes_through_s3_and_comes_back_intact(
    payloads: Payloads, sqs: Any, s3: Any, queue: tuple[str, str]
) -> None:
    name, url = queue
    body = big_body(3 * 1024 * 1024)
    packed = payloads.pack(body, body_limit(sqs, name, url), task="app.report", queue=name)
    assert packed.stored is not None and packed.body.startswith(f'["{POINTER_CLASS}"')
    send(sqs, url, packed)

    message = receive(sqs, name, url)
    assert message.body == packed.body
    assert message.attributes[SIZE_ATTRIBUTE] == str(len(body.encode()))
    assert message.attributes[DIGEST_ATTRIBUTE] == hashlib.sha256(body.encode()).hexdigest()
    assert payloads.unpack(message) == (body, packed.stored)


@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_extended_client_messages_are_unpacked(
    extended: Any, payloads: Payloads, sqs: Any, queue: tuple[str, str], legacy: bool
) -> None:
    name, url = queue
    extended.use_legacy_attribute = legacy
    body = big_body(OVER_EXTENDED_THRESHOLD)
    extended.send_message(QueueUrl=url, MessageBody=body)

    message = receive(sqs, name, url)
    size_attribute = LEGACY_SIZE_ATTRIBUTE if legacy else SIZE_ATTRIBUTE
    assert message.attributes == {size_attribute: str(len(body.encode()))}
    assert message.body.startswith(f'["{LEGACY_POINTER_CLASS if legacy else POINTER_CLASS}"')
    text, ref = payloads.unpack(message)
    assert text == body
    assert ref is not None and ref.bucket == payloads.settings.large_payload_bucket


def test_the_extended_client_reads_what_ebsqs_offloads(
    extended: Any, bucket: str, sqs: Any, queue: tuple[str, str]
) -> None:
    name, url = queue
    payloads = Payloads(
        Settings().replace(large_payload_bucket=bucket, large_payload_over=256 * 1024)
    )
    body = big_body(OVER_EXTENDED_THRESHOLD)
    packed = payloads.pack(body, body_limit(sqs, name, url), task="app.report", queue=name)
    assert packed.stored is not None
    send(sqs, url, packed)

    response = extended.receive_message(
        QueueUrl=url, MessageAttributeNames=["All"], WaitTimeSeconds=5
    )
    [message] = response["Messages"]
    assert message["Body"] == body


def test_a_tampered_object_is_refused(
    payloads: Payloads, sqs: Any, s3: Any, queue: tuple[str, str]
) -> None:
    name, url = queue
    packed = payloads.pack(
        big_body(2 * 1024 * 1024), body_limit(sqs, name, url), task="t", queue=name
    )
    assert packed.stored is not None
    send(sqs, url, packed)
    s3.put_object(Bucket=packed.stored.bucket, Key=packed.stored.key, Body=b'{"v":1,"task":"x"}')

    with pytest.raises(PayloadError, match="SHA-256") as caught:
        payloads.unpack(receive(sqs, name, url))
    assert isinstance(caught.value, EnvelopeError)
    assert str(packed.stored) in str(caught.value)


def test_a_pointer_to_a_foreign_bucket_is_refused_unread(
    env: str, s3: Any, payloads: Payloads, sqs: Any, queue: tuple[str, str]
) -> None:
    name, url = queue
    foreign = new_bucket(s3)
    sender = extended_client(foreign)
    sender.send_message(QueueUrl=url, MessageBody=big_body(OVER_EXTENDED_THRESHOLD))

    with pytest.raises(PayloadError, match=f"'{foreign}'"):
        payloads.unpack(receive(sqs, name, url))
    assert payloads._client is None  # the foreign object was never asked for


def test_s3_down_is_transient_on_unpack_and_a_clear_error_on_pack(
    payloads: Payloads, sqs: Any, queue: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, url = queue
    limit = body_limit(sqs, name, url)
    body = big_body(2 * 1024 * 1024)
    send(sqs, url, payloads.pack(body, limit, task="app.report", queue=name))
    message = receive(sqs, name, url)

    down = f"http://127.0.0.1:{servers.free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", down)  # SQS stays up
    cut_off = Payloads(payloads.settings)
    with pytest.raises(PayloadUnavailable, match=down) as caught:
        cut_off.unpack(message)
    assert not isinstance(caught.value, EnvelopeError)  # released, never dead-lettered

    with pytest.raises(PayloadUnavailable, match="AWS_ENDPOINT_URL_S3") as failed:
        cut_off.pack(body, limit, task="app.report", queue=name)
    assert "PutObject" in str(failed.value) and down in str(failed.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", payloads.client.meta.endpoint_url)
    assert Payloads(payloads.settings).unpack(message)[0] == body  # back up: the same message


def test_discard_deletes_the_object(
    payloads: Payloads, sqs: Any, s3: Any, queue: tuple[str, str]
) -> None:
    name, url = queue
    packed = payloads.pack(
        big_body(2 * 1024 * 1024), body_limit(sqs, name, url), task="t", queue=name
    )
    send(sqs, url, packed)
    _, ref = payloads.unpack(receive(sqs, name, url))
    assert ref is not None and ref == packed.stored
    s3.head_object(Bucket=ref.bucket, Key=ref.key)

    payloads.discard(ref)
    with pytest.raises(ClientError) as caught:
        s3.head_object(Bucket=ref.bucket, Key=ref.key)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404

"""SQS-specific behaviour of SQSBroker: what the shared conformance suite cannot reach.

Real SQS behaviours no emulator reproduces (per-entry batch failures, throttling, exact error
codes) are simulated in-process with botocore's ``before-send`` event hook: the handler returns
a crafted response and the request never leaves the process. Returning None lets a request
through to the server (moto on 127.0.0.1) as usual.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.compat import HTTPHeaders
from botocore.config import Config
from structlog.testing import capture_logs

from ebsqs.brokers.base import WORKER_ATTRIBUTES, OutgoingMessage, QueueSettings, ReceivedMessage
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.errors import (
    BrokerAccessDenied,
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    MessageTooLargeError,
    PartialBatchError,
    QueueDoesNotExist,
)
from tests import extended, servers

Handler = Callable[[dict[str, Any]], AWSResponse | None]


class _Body:
    """The raw body botocore reads a crafted response from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self._data


def crafted(payload: Mapping[str, Any], status: int = 200, **headers: str) -> AWSResponse:
    """A response as SQS's JSON protocol would send it."""
    head = HTTPHeaders()
    for name, value in {"Content-Type": "application/x-amz-json-1.0", **headers}.items():
        head[name] = value
    head["x-amzn-RequestId"] = "crafted"
    return AWSResponse("http://crafted.invalid/", status, head, _Body(json.dumps(payload).encode()))


def crafted_error(code: str, message: str = "crafted", status: int = 400) -> AWSResponse:
    """An error response, with the query-compatible code header real SQS sends."""
    return crafted(
        {"__type": f"com.amazonaws.sqs#{code}", "message": message},
        status,
        **{"x-amzn-query-error": f"{code};Sender"},
    )


def failure(entry_id: str, code: str, *, sender_fault: bool) -> dict[str, Any]:
    return {"Id": entry_id, "SenderFault": sender_fault, "Code": code, "Message": code.lower()}


class Hook:
    """Intercepts one SQS operation: records each request and answers with a script.

    ``script`` holds one handler per call, in order; once it runs out, requests go through.
    """

    def __init__(self, broker: SQSBroker, operation: str, *script: Handler) -> None:
        self.requests: list[dict[str, Any]] = []
        self._script = list(script)
        # The stubs type handlers as returning None; a before-send handler may return a response.
        for client in broker.clients():
            client.meta.events.register(f"before-send.sqs.{operation}", self)  # type: ignore[arg-type]

    def __call__(self, request: AWSPreparedRequest, **_: object) -> AWSResponse | None:
        body = json.loads(request.body) if isinstance(request.body, str | bytes) else {}
        self.requests.append(body)
        return self._script.pop(0)(body) if self._script else None


def answer_send(failed: Mapping[str, dict[str, Any]]) -> Handler:
    """A SendMessageBatch answer: the entries in ``failed`` fail, the others succeed."""

    def handler(body: dict[str, Any]) -> AWSResponse:
        ok = [e for e in body["Entries"] if e["Id"] not in failed]
        successful = [
            {"Id": e["Id"], "MessageId": f"crafted-{e['Id']}", "MD5OfMessageBody": "-"} for e in ok
        ]
        return crafted({"Successful": successful, "Failed": list(failed.values())})

    return handler


def answer_batch(failed: Mapping[str, dict[str, Any]]) -> Handler:
    """A Delete/ChangeMessageVisibilityBatch answer: ``failed`` fail, the others succeed."""

    def handler(body: dict[str, Any]) -> AWSResponse:
        ok = [{"Id": e["Id"]} for e in body["Entries"] if e["Id"] not in failed]
        return crafted({"Successful": ok, "Failed": list(failed.values())})

    return handler


def entry_ids(request: dict[str, Any]) -> list[str]:
    return [entry["Id"] for entry in request["Entries"]]


@pytest.fixture
def broker(sqs_env: str) -> Iterator[SQSBroker]:
    broker = SQSBroker()
    yield broker
    broker.close()


@pytest.fixture
def queue(broker: SQSBroker, unique_queue: Callable[..., str]) -> str:
    name = unique_queue()
    broker.ensure_queue(name, QueueSettings(visibility_timeout=30))
    return name


def receive_all(broker: SQSBroker, queue: str, count: int) -> list[ReceivedMessage]:
    received: list[ReceivedMessage] = []
    while len(received) < count:
        batch = broker.receive(queue, 10, 1)
        assert batch, f"received {len(received)} of {count}"
        received.extend(batch)
    return received


# -- batch sends --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_send_batch_retries_only_the_entry_that_failed_transiently(
    broker: SQSBroker, queue: str
) -> None:
    hook = Hook(
        broker,
        "SendMessageBatch",
        answer_send({"1": failure("1", "InternalError", sender_fault=False)}),
    )

    with capture_logs() as logs:
        ids = broker.send_batch(queue, [OutgoingMessage(f"m{i}") for i in range(3)])

    assert [entry_ids(r) for r in hook.requests] == [["0", "1", "2"], ["1"]]
    assert ids[0] == "crafted-0" and ids[2] == "crafted-2"
    [resent] = broker.receive(queue, 10, 2)  # only the retried entry reached the server
    assert (resent.message_id, resent.body) == (ids[1], "m1")
    [event] = [e for e in logs if e["event"] == "sqs_batch_entries_retried"]
    assert event["operation"] == "send_message_batch"
    assert event["entries"] == 1
    assert event["errors"] == ["InternalError: internalerror"]


@pytest.mark.timeout(30)
def test_send_batch_does_not_retry_a_sender_fault(broker: SQSBroker, queue: str) -> None:
    bad = failure("1", "InvalidParameterValue", sender_fault=True)
    hook = Hook(broker, "SendMessageBatch", answer_send({"1": bad}))

    with pytest.raises(PartialBatchError) as error:
        broker.send_batch(queue, [OutgoingMessage(f"m{i}") for i in range(3)])

    assert len(hook.requests) == 1
    assert error.value.failed == {1: "InvalidParameterValue: invalidparametervalue"}
    assert error.value.succeeded == {0: "crafted-0", 2: "crafted-2"}


@pytest.mark.timeout(30)
def test_send_batch_gives_up_on_an_entry_that_keeps_failing(broker: SQSBroker, queue: str) -> None:
    flaky = {"0": failure("0", "ServiceUnavailable", sender_fault=False)}
    hook = Hook(broker, "SendMessageBatch", *[answer_send(flaky)] * 3)

    with pytest.raises(PartialBatchError) as error:
        broker.send_batch(queue, [OutgoingMessage("m0"), OutgoingMessage("m1")])

    assert [entry_ids(r) for r in hook.requests] == [["0", "1"], ["0"], ["0"]]
    assert error.value.failed == {0: "ServiceUnavailable: serviceunavailable"}
    assert error.value.succeeded == {1: "crafted-1"}


@pytest.mark.timeout(30)
def test_send_maps_attributes_and_leaves_out_what_is_not_set(broker: SQSBroker, queue: str) -> None:
    hook = Hook(broker, "SendMessageBatch")

    broker.send(queue, OutgoingMessage("body", delay=3, attributes={"reason": "r", "n": -12}))

    [entry] = hook.requests[0]["Entries"]
    assert entry["MessageAttributes"] == {
        "reason": {"DataType": "String", "StringValue": "r"},
        "n": {"DataType": "Number", "StringValue": "-12"},
    }
    assert entry["DelaySeconds"] == 3
    assert "MessageGroupId" not in entry and "MessageDeduplicationId" not in entry


@pytest.mark.timeout(30)
def test_send_to_a_standard_queue_keeps_the_group(broker: SQSBroker, queue: str) -> None:
    hook = Hook(broker, "SendMessageBatch")

    broker.send(queue, OutgoingMessage("tenant work", group_id="tenant-1"))

    [entry] = hook.requests[0]["Entries"]
    assert entry["MessageGroupId"] == "tenant-1"
    assert "MessageDeduplicationId" not in entry


@pytest.mark.timeout(30)
def test_fifo_delay_is_refused_before_calling_sqs(
    broker: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    queue = unique_queue(fifo=True)
    broker.ensure_queue(queue, QueueSettings(fifo=True))
    hook = Hook(broker, "SendMessageBatch")

    with pytest.raises(BrokerError, match="FIFO queues take no per-message delay"):
        broker.send(queue, OutgoingMessage("later", delay=30, group_id="g", dedup_id="d"))

    assert hook.requests == []


# -- acks and visibility ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_ack_returns_the_entries_sqs_refused(broker: SQSBroker, queue: str) -> None:
    broker.send_batch(queue, [OutgoingMessage("a"), OutgoingMessage("b")])
    received = receive_all(broker, queue, 2)
    invalid = failure("1", "ReceiptHandleIsInvalid", sender_fault=True)
    hook = Hook(broker, "DeleteMessageBatch", answer_batch({"1": invalid}))

    failed = broker.ack(received)

    assert failed == {received[1].message_id: "ReceiptHandleIsInvalid: receipthandleisinvalid"}
    assert len(hook.requests) == 1


@pytest.mark.timeout(30)
def test_ack_retries_a_transient_entry_failure(broker: SQSBroker, queue: str) -> None:
    broker.send_batch(queue, [OutgoingMessage("a"), OutgoingMessage("b")])
    received = receive_all(broker, queue, 2)
    # The first answer is crafted (nothing deleted); the retry of entry 1 reaches moto.
    hook = Hook(
        broker,
        "DeleteMessageBatch",
        answer_batch({"1": failure("1", "InternalError", sender_fault=False)}),
    )

    assert broker.ack(received) == {}

    assert [entry_ids(r) for r in hook.requests] == [["0", "1"], ["1"]]
    assert hook.requests[1]["Entries"][0]["ReceiptHandle"] == received[1].receipt


@pytest.mark.timeout(30)
def test_ack_and_change_visibility_go_ten_per_call(broker: SQSBroker, queue: str) -> None:
    broker.send_batch(queue, [OutgoingMessage(f"m{i}") for i in range(10)])
    broker.send_batch(queue, [OutgoingMessage(f"n{i}") for i in range(2)])
    received = receive_all(broker, queue, 12)
    changes = Hook(broker, "ChangeMessageVisibilityBatch")
    deletes = Hook(broker, "DeleteMessageBatch")

    assert broker.change_visibility(received, 60) == {}
    assert broker.ack(received) == {}

    assert [len(r["Entries"]) for r in changes.requests] == [10, 2]
    assert {e["VisibilityTimeout"] for r in changes.requests for e in r["Entries"]} == {60}
    assert [len(r["Entries"]) for r in deletes.requests] == [10, 2]
    assert broker.stats(queue).in_flight == 0


@pytest.mark.timeout(30)
def test_receive_asks_for_system_and_message_attributes(broker: SQSBroker, queue: str) -> None:
    hook = Hook(broker, "ReceiveMessage")

    broker.receive(queue, 3, 1.9)
    broker.receive(queue, 1, 0, visibility_timeout=7)
    broker.receive(queue, 1, 0, metadata=False)

    plain, with_visibility, lean = hook.requests
    assert plain["MessageSystemAttributeNames"] == [
        "ApproximateReceiveCount",
        "SentTimestamp",
        "MessageGroupId",
        "MessageDeduplicationId",
    ]
    assert plain["MessageAttributeNames"] == ["All"]
    assert (plain["MaxNumberOfMessages"], plain["WaitTimeSeconds"]) == (3, 1)
    assert "AttributeNames" not in plain and "VisibilityTimeout" not in plain
    assert with_visibility["VisibilityTimeout"] == 7
    # The worker's hot path: only what the loop uses.
    assert lean["MessageSystemAttributeNames"] == [
        "ApproximateReceiveCount",
        "MessageGroupId",
        "MessageDeduplicationId",
    ]
    assert lean["MessageAttributeNames"] == list(WORKER_ATTRIBUTES)


@pytest.mark.timeout(30)
def test_receive_without_metadata_leaves_other_attributes_on_the_server(
    broker: SQSBroker, queue: str
) -> None:
    pointer: dict[str, str | int] = {WORKER_ATTRIBUTES[0]: 5000, "ebsqs-error": "why"}
    broker.send(queue, OutgoingMessage("pointer", attributes=pointer))

    [received] = broker.receive(queue, 1, 2, metadata=False)

    assert dict(received.attributes) == {WORKER_ATTRIBUTES[0]: "5000"}
    assert received.sent_at is None
    assert received.receive_count == 1


# -- sizes --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_body_limit_reads_maximum_message_size_once(
    broker: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    name = unique_queue()
    broker.ensure_queue(name, QueueSettings(max_body_bytes=4096))
    fresh = SQSBroker()
    reads = Hook(fresh, "GetQueueAttributes")

    first = fresh.body_limit(name)
    fresh.send(name, OutgoingMessage("x"))

    assert (first.bytes, first.source) == (4096, f"MaximumMessageSize of SQS queue {name!r}")
    assert fresh.body_limit(name) == first
    assert [r["AttributeNames"] for r in reads.requests] == [["MaximumMessageSize"]]
    fresh.close()


@pytest.mark.timeout(30)
def test_ensure_queue_caches_the_size_it_sets(
    broker: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    name = unique_queue()
    reads = Hook(broker, "GetQueueAttributes")

    broker.ensure_queue(name, QueueSettings(max_body_bytes=2048))

    assert broker.body_limit(name).bytes == 2048
    assert reads.requests == []


@pytest.mark.timeout(30)
def test_the_size_is_dropped_with_the_url(
    broker: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    name = unique_queue()
    broker.ensure_queue(name, QueueSettings(max_body_bytes=2048))
    other = SQSBroker()
    other.delete_queue(name)

    with pytest.raises(QueueDoesNotExist):
        broker.send(name, OutgoingMessage("gone"))
    other.ensure_queue(name, QueueSettings(max_body_bytes=8192))

    assert broker.body_limit(name).bytes == 8192
    broker.send(name, OutgoingMessage("y" * 4000))
    other.close()


@pytest.mark.timeout(30)
def test_the_brokers_limit_caps_the_queues(sqs_env: str, queue: str) -> None:
    broker = SQSBroker(max_body_bytes=1500)

    limit = broker.body_limit(queue)

    assert (limit.bytes, limit.source) == (1500, "the SQS broker's limit")
    with pytest.raises(MessageTooLargeError):
        broker.send(queue, OutgoingMessage("x" * 1501))


@pytest.mark.timeout(30)
def test_an_unreadable_size_falls_back_to_the_brokers_limit(broker: SQSBroker, queue: str) -> None:
    """A producer allowed only sqs:SendMessage still sends; SQS itself checks the size."""
    fresh = SQSBroker()
    denied = crafted_refusal("AccessDeniedException", "AccessDenied")
    Hook(fresh, "GetQueueAttributes", lambda _: denied)

    with capture_logs() as logs:
        limit = fresh.body_limit(queue)
        message_id = fresh.send(queue, OutgoingMessage("sent anyway"))

    assert limit.bytes == fresh.max_body_bytes
    assert "unreadable" in limit.source and repr(queue) in limit.source
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "sqs_queue_size_unreadable"
    ]
    assert [m.message_id for m in broker.receive(queue, 1, 2)] == [message_id]
    fresh.close()


# -- errors -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("code", ["RequestThrottled", "ThrottlingException"])
def test_throttling_is_retried_until_it_passes(broker: SQSBroker, queue: str, code: str) -> None:
    hook = Hook(broker, "SendMessageBatch", lambda _: crafted_error(code))

    message_id = broker.send(queue, OutgoingMessage("patient"))

    assert len(hook.requests) == 2
    [received] = broker.receive(queue, 1, 2)
    assert received.message_id == message_id


@pytest.mark.timeout(30)
def test_throttling_that_never_stops_is_broker_unavailable(sqs_env: str, queue: str) -> None:
    broker = SQSBroker(config=Config(retries={"mode": "standard", "total_max_attempts": 2}))
    hook = Hook(broker, "SendMessageBatch", *[lambda _: crafted_error("RequestThrottled")] * 10)

    with pytest.raises(BrokerUnavailable, match="kept refusing SendMessageBatch") as error:
        broker.send(queue, OutgoingMessage("x"))

    assert len(hook.requests) == 2
    assert sqs_env in str(error.value)


@pytest.mark.timeout(30)
def test_unreachable_endpoint_is_broker_unavailable_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = f"http://127.0.0.1:{servers.free_port()}"  # nothing listens there
    servers.apply_sqs_env(monkeypatch, endpoint)
    broker = SQSBroker(config=Config(retries={"mode": "standard", "total_max_attempts": 2}))
    started = time.monotonic()

    with pytest.raises(BrokerUnavailable, match="AWS_ENDPOINT_URL_SQS") as error:
        broker.send("anything", OutgoingMessage("x"))

    assert f"cannot reach SQS at {endpoint}" in str(error.value)
    assert time.monotonic() - started < 10


def crafted_refusal(json_type: str, query_code: str | None, status: int = 400) -> AWSResponse:
    """An error as SQS's JSON protocol sends it: the type in the body, and (with the query
    compatibility header real SQS adds) the query protocol's code, which botocore then reports."""
    headers = {"x-amzn-query-error": f"{query_code};Sender"} if query_code else {}
    body = {"__type": f"com.amazon.coral.service#{json_type}", "message": "crafted refusal"}
    return crafted(body, status, **headers)


_REFUSALS = [
    # (JSON type, query code, the operation refused, what the message says to fix)
    ("AccessDeniedException", "AccessDenied", "GetQueueAttributes", "sqs:GetQueueAttributes"),
    ("UnrecognizedClientException", "InvalidClientTokenId", "GetQueueAttributes", "credentials"),
    ("KmsAccessDenied", "KMS.AccessDeniedException", "ReceiveMessage", "kms:Decrypt"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("compatible", [False, True], ids=["json-code", "query-code"])
@pytest.mark.parametrize(
    ("json_type", "query_code", "operation", "fix"),
    _REFUSALS,
    ids=[refusal[0] for refusal in _REFUSALS],
)
def test_refused_identity_or_permission_is_access_denied(
    broker: SQSBroker,
    queue: str,
    json_type: str,
    query_code: str,
    operation: str,
    fix: str,
    compatible: bool,
) -> None:
    code = query_code if compatible else json_type  # what botocore reports
    refusal = crafted_refusal(json_type, query_code if compatible else None)
    hook = Hook(broker, operation, lambda _: refusal)
    call = {"GetQueueAttributes": broker.stats, "ReceiveMessage": lambda q: broker.receive(q, 1, 0)}

    with pytest.raises(BrokerAccessDenied) as raised:
        call[operation](queue)

    # A configuration error, so a worker meeting it at start stops instead of restarting.
    assert isinstance(raised.value, ConfigurationError)
    assert isinstance(raised.value, BrokerError)
    assert raised.value.__cause__ is not None
    text = str(raised.value)
    assert f"{operation} denied ({code}: crafted refusal)" in text
    assert fix in text and repr(queue) in text
    assert len(hook.requests) == 1  # not retried: no retry grants a permission


@pytest.mark.timeout(30)
def test_a_refusal_that_is_not_about_access_stays_a_broker_error(
    broker: SQSBroker, queue: str
) -> None:
    Hook(broker, "GetQueueAttributes", lambda _: crafted_refusal("OverLimit", "OverLimit"))

    with pytest.raises(BrokerError) as raised:
        broker.stats(queue)

    assert not isinstance(raised.value, ConfigurationError)


@pytest.mark.timeout(30)
def test_purge_in_progress_says_to_wait(broker: SQSBroker, queue: str) -> None:
    Hook(
        broker,
        "PurgeQueue",
        lambda _: crafted_error("AWS.SimpleQueueService.PurgeQueueInProgress"),
    )

    with pytest.raises(BrokerError, match="one purge per queue every 60 seconds"):
        broker.purge(queue)


@pytest.mark.timeout(30)
def test_queue_deleted_elsewhere_drops_the_cached_url(
    broker: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    name = unique_queue()
    broker.ensure_queue(name)
    broker.send(name, OutgoingMessage("cached"))
    other = SQSBroker()
    other.delete_queue(name)

    with pytest.raises(QueueDoesNotExist):
        broker.send(name, OutgoingMessage("gone"))
    other.ensure_queue(name)

    broker.send(name, OutgoingMessage("again"))
    assert [m.body for m in other.receive(name, 10, 2)] == ["again"]


@pytest.mark.timeout(30)
def test_missing_region_is_a_configuration_error(
    sqs_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing"))
    broker = SQSBroker()  # nothing is resolved until first use

    with pytest.raises(ConfigurationError, match="AWS_DEFAULT_REGION"):
        broker.list_queues()
    assert SQSBroker(region="us-east-1").list_queues("nothing-has-this-prefix") == []


@pytest.mark.timeout(30)
def test_missing_credentials_is_a_configuration_error(
    sqs_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    for name in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing"))

    with pytest.raises(ConfigurationError, match="AWS_ACCESS_KEY_ID"):
        SQSBroker().list_queues()


# -- queues -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sqs_env", ["moto", "fauxqs"], indirect=True)
def test_fifo_queue_with_a_fifo_dead_letter_queue(
    broker: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    queue, dlq = unique_queue(fifo=True), unique_queue(fifo=True)
    broker.ensure_queue(queue, QueueSettings(fifo=True, dead_letter_queue=dlq, max_receive_count=3))

    ids = broker.send_batch(
        queue,
        [OutgoingMessage(f"m{i}", group_id="g", dedup_id=f"d{i}") for i in range(3)],
    )

    # One group: each message comes after the one before it is deleted (fauxqs hands out one
    # message per group per receive, SQS and moto may hand out several).
    received: list[ReceivedMessage] = []
    while len(received) < 3:
        batch = broker.receive(queue, 10, 1)
        assert batch, f"received {len(received)} of 3"
        assert broker.ack(batch) == {}
        received.extend(batch)
    assert [(m.message_id, m.body) for m in received] == [(ids[i], f"m{i}") for i in range(3)]
    attributes = queue_attributes(broker, queue)
    assert attributes["FifoQueue"] == "true"
    assert json.loads(attributes["RedrivePolicy"])["deadLetterTargetArn"].endswith(f":{dlq}")


def queue_attributes(broker: SQSBroker, queue: str) -> dict[str, str]:
    url = broker.client.get_queue_url(QueueName=queue)["QueueUrl"]
    response = broker.client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    return {str(name): value for name, value in response["Attributes"].items()}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sqs_env", ["moto", "fauxqs"], indirect=True)
@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
def test_ensure_queue_sets_the_size_and_fifo_deduplication(
    broker: SQSBroker, unique_queue: Callable[..., str], fifo: bool
) -> None:
    queue, dlq = unique_queue(fifo=fifo), unique_queue(fifo=fifo)

    broker.ensure_queue(
        queue, QueueSettings(fifo=fifo, dead_letter_queue=dlq, max_body_bytes=65536)
    )

    for name in (queue, dlq):
        attributes = queue_attributes(broker, name)
        assert attributes["MaximumMessageSize"] == "65536"
        assert attributes.get("ContentBasedDeduplication", "false") == str(fifo).lower()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("queue_name", "settings"),
    [
        ("plain", QueueSettings(fifo=True)),
        ("q.fifo", QueueSettings(fifo=False)),
        ("q.fifo", QueueSettings(fifo=True, dead_letter_queue="plain-dlq")),
    ],
)
def test_fifo_names_are_checked_before_calling_sqs(
    monkeypatch: pytest.MonkeyPatch, queue_name: str, settings: QueueSettings
) -> None:
    servers.apply_sqs_env(monkeypatch, f"http://127.0.0.1:{servers.free_port()}")

    with pytest.raises(ConfigurationError, match=r"\.fifo"):
        SQSBroker().ensure_queue(queue_name, settings)


@pytest.mark.timeout(30)
def test_ensure_queue_updates_the_attributes_of_an_existing_queue(
    broker: SQSBroker, unique_queue: Callable[..., str]
) -> None:
    queue, dlq = unique_queue(), unique_queue()
    broker.ensure_queue(queue, QueueSettings(visibility_timeout=30))

    with capture_logs() as logs:
        broker.ensure_queue(
            queue,
            QueueSettings(
                visibility_timeout=45,
                dead_letter_queue=dlq,
                max_receive_count=4,
                max_body_bytes=4096,
            ),
        )

    attributes = queue_attributes(broker, queue)
    assert attributes["VisibilityTimeout"] == "45"
    assert attributes["MaximumMessageSize"] == "4096"
    assert str(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"]) == "4"
    assert any(e["event"] == "sqs_queue_attributes_updated" for e in logs)
    assert SQSBroker().body_limit(queue).bytes == 4096


# -- processes ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_forked_child_builds_its_own_client(broker: SQSBroker, queue: str) -> None:
    broker.send(queue, OutgoingMessage("from the parent"))
    parent_client = broker.client

    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            reused = broker.client is parent_client
            broker.send(queue, OutgoingMessage("from the child"))
            code = 2 if reused else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0, "the child reused the parent's client"
    assert broker.client is parent_client
    bodies = sorted(m.body for m in receive_all(broker, queue, 2))
    assert bodies == ["from the child", "from the parent"]


@pytest.mark.timeout(30)
def test_an_app_that_imported_the_extended_client_still_gets_a_plain_sqs_client(
    sqs_env: str, unique_queue: Callable[..., str]
) -> None:
    """Importing ``sqs_extended_client`` swaps ``boto3.session.Session`` for the process; an
    Extended Client would fetch pointers itself, from any bucket, and rewrite receipt handles."""
    import boto3

    saved = boto3.session.Session, boto3.Session
    boto3.session.Session = boto3.Session = extended.session_class()  # what its import does
    try:
        broker = SQSBroker()
        queue = unique_queue()
        broker.ensure_queue(queue)
        assert not hasattr(broker.client, "large_payload_support")
        pointer = json.dumps(
            [
                "software.amazon.payloadoffloading.PayloadS3Pointer",
                {"s3BucketName": "b", "s3Key": "k"},
            ]
        )
        broker.send(queue, OutgoingMessage(pointer, attributes={"ExtendedPayloadSize": 5}))
        [message] = broker.receive(queue, 1, 0, metadata=False)
        assert message.body == pointer  # left for ebsqs's own checks, not fetched
        assert message.attributes["ExtendedPayloadSize"] == "5"
        broker.close()
    finally:
        boto3.session.Session, boto3.Session = saved  # type: ignore[misc]

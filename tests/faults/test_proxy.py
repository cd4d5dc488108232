"""The chaos proxy does what the fault tests rely on: each fault, seen from a real boto3 client.

The client here makes one attempt per call (no botocore retries), so each fault shows as the
error a client meets on its first try.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from tests import servers
from tests.faults.proxy import (
    KMS_THROTTLED,
    OVER_LIMIT,
    SERVICE_UNAVAILABLE,
    THROTTLED,
    ChaosProxy,
    SqsError,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.fauxqs, pytest.mark.timeout(30)]


@pytest.fixture
def proxy(fauxqs_server: str) -> Iterator[ChaosProxy]:
    with ChaosProxy(fauxqs_server, lifetime=60) as the_proxy:
        yield the_proxy


def client(endpoint: str, read_timeout: float = 5) -> Any:
    return boto3.session.Session().client(
        "sqs",
        endpoint_url=endpoint,
        region_name=servers.REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=1,
            read_timeout=read_timeout,
        ),
    )


@pytest.fixture
def sqs(proxy: ChaosProxy) -> Any:
    return client(proxy.endpoint)


@pytest.fixture
def queue_url(sqs: Any, unique_queue: Any) -> str:
    return str(sqs.create_queue(QueueName=unique_queue())["QueueUrl"])


def test_it_forwards_and_counts_per_operation(proxy: ChaosProxy, sqs: Any, queue_url: str) -> None:
    sqs.send_message(QueueUrl=queue_url, MessageBody="hello")
    [message] = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1)["Messages"]
    assert message["Body"] == "hello"
    assert proxy.requests["SendMessage"] == 1 and proxy.requests["ReceiveMessage"] == 1
    assert proxy.requests["CreateQueue"] == 1


@pytest.mark.parametrize("error", [THROTTLED, OVER_LIMIT, KMS_THROTTLED, SERVICE_UNAVAILABLE])
def test_injected_errors_read_as_sqs_errors(
    proxy: ChaosProxy, sqs: Any, queue_url: str, error: SqsError
) -> None:
    proxy.inject("ReceiveMessage", error, count=1)
    with pytest.raises(ClientError) as caught:
        sqs.receive_message(QueueUrl=queue_url)
    assert caught.value.response["Error"]["Code"] == error.query_code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == error.status
    # count=1: spent; other operations were never affected.
    assert sqs.receive_message(QueueUrl=queue_url).get("Messages") is None
    assert proxy.faulted == {"ReceiveMessage": 1}


def test_a_rate_hits_about_that_share(proxy: ChaosProxy, sqs: Any, queue_url: str) -> None:
    proxy.inject("GetQueueAttributes", THROTTLED, rate=0.5)
    failures = 0
    for _ in range(60):
        try:
            sqs.get_queue_attributes(QueueUrl=queue_url)
        except ClientError:
            failures += 1
    assert 15 <= failures <= 45


def test_a_dropped_response_was_acted_on(proxy: ChaosProxy, sqs: Any, queue_url: str) -> None:
    proxy.drop("SendMessage", forward=True, count=1)
    with pytest.raises(ConnectionClosedError):
        sqs.send_message(QueueUrl=queue_url, MessageBody="acted")
    got = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1)["Messages"]
    assert [m["Body"] for m in got] == ["acted"]


def test_a_dropped_request_never_reaches_the_server(
    proxy: ChaosProxy, sqs: Any, queue_url: str
) -> None:
    proxy.drop("SendMessage", forward=False, count=1)
    with pytest.raises(ConnectionClosedError):
        sqs.send_message(QueueUrl=queue_url, MessageBody="lost")
    assert sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages") is None


def test_refused_then_restored(proxy: ChaosProxy, sqs: Any, queue_url: str) -> None:
    fresh = client(proxy.endpoint)  # a new pool: its first request opens a connection
    proxy.refuse(1.5)  # made before: building a client can take longer than the refusal
    wait_until(lambda: _port_refuses(proxy.port), 1, message="the port never closed")
    with pytest.raises(EndpointConnectionError):
        fresh.list_queues()
    wait_until(lambda: _answers(fresh), 5, interval=0.05)


def _port_refuses(port: int) -> bool:
    """Whether a connection to ``port`` is refused (the proxy closes it within a tick)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def _answers(sqs: Any) -> bool:
    try:
        sqs.list_queues()
    except BotoCoreError:  # refused, reset or timed out: not answering yet
        return False
    return True


def test_blackhole_holds_requests_unanswered(proxy: ChaosProxy, queue_url: str) -> None:
    slow = client(proxy.endpoint, read_timeout=0.5)
    proxy.blackhole(3)
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        slow.list_queues()
    assert time.monotonic() - started < 2.5
    wait_until(lambda: _answers(slow), 6, interval=0.05, message="the blackhole never ended")


def test_latency_delays_one_operation(proxy: ChaosProxy, sqs: Any, queue_url: str) -> None:
    proxy.latency(0.4, "GetQueueAttributes")
    started = time.monotonic()
    sqs.list_queues()
    assert time.monotonic() - started < 0.3
    started = time.monotonic()
    sqs.get_queue_attributes(QueueUrl=queue_url)
    assert time.monotonic() - started >= 0.4


def test_it_stops_by_itself_and_only_forwards_to_loopback(fauxqs_server: str) -> None:
    with pytest.raises(ValueError, match=r"only forwards to http://127\.0\.0\.1"):
        ChaosProxy("http://10.0.0.1:4566")
    short = ChaosProxy(fauxqs_server, lifetime=0.3)
    assert short.stopped.wait(5), "the proxy outlived its lifetime"
    with pytest.raises(EndpointConnectionError):
        client(short.endpoint).list_queues()
    wait_until(lambda: not short.serving(), 5, message="the proxy's thread still runs")


def test_an_answer_of_the_tests_making_is_never_forwarded(
    proxy: ChaosProxy, sqs: Any, queue_url: str
) -> None:
    seen: list[dict[str, Any]] = []

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        seen.append(request)
        return {"Attributes": {"VisibilityTimeout": "4242"}}

    proxy.answer("GetQueueAttributes", respond, count=1)
    got = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"])
    assert got["Attributes"] == {"VisibilityTimeout": "4242"}
    assert seen[0]["QueueUrl"] == queue_url
    real = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"])
    assert real["Attributes"]["VisibilityTimeout"] == "30"
    assert proxy.answered["GetQueueAttributes"] == 1  # only the second reached the server

"""FIFO queues and large payloads against plain boto3 programs, side by side, in this process.

(a) FIFO drain: an in-process ebsqs :class:`~ebsqs.worker.Worker` (inline executor, no-op
    tasks) against a plain loop (receive ten, parse, call a no-op, ``delete_message_batch``) on
    identical FIFO queues of ``GROUPS`` groups, pre-loaded; runs alternate (ABBA), medians are
    compared. Both must honour the group rules the server applies (fauxqs hands out one message
    per group per receive), so the ratio charges ebsqs with its own per-group bookkeeping: the
    flush of a group's delete before its next message starts, and the ordering checks.
(b) Claim-check send: ``.delay()`` of a 2 MB argument with ``large_payload_bucket`` set (encode,
    SHA-256, ``PutObject``, ``SendMessage`` of the pointer) against a plain ``json.dumps``,
    ``put_object`` and ``send_message`` of a pointer of its own.
(c) Claim-check receive: an ebsqs worker running those messages (receive, ``GetObject``,
    digest check, the hostile-input checks of decoding, run, delete the message and the object)
    against a plain loop that receives, fetches, parses, and deletes both, checking nothing.
    No goal for (b) and (c): on a local server a 2 MB body is CPU-bound, so the ratio shows what
    ebsqs's checks cost per byte; on AWS the S3 round trips dominate both.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import boto3

from benchmarks import Result
from benchmarks.tasks import carry, noop
from ebsqs import producer
from ebsqs.brokers import QueueSettings
from ebsqs.brokers.sqs import SQSBroker
from ebsqs.config import load_settings
from ebsqs.envelope import Envelope, encode
from ebsqs.executors.inline import InlineExecutor
from ebsqs.worker import Worker, WorkerOptions

GROUPS = 10
PAYLOAD_CHARS = 2_000_000


def run(endpoint: str, *, quick: bool = False) -> list[Result]:
    """Measure; return ratios (``endpoint`` is fauxqs, also in this process's environment)."""
    messages = 200 if quick else 2_000
    payloads = 5 if quick else 20
    rounds = 1 if quick else 2
    client: Any = boto3.client("sqs", endpoint_url=endpoint)
    s3: Any = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    ebsqs_fifo, plain_fifo = [], []
    for _ in range(rounds):  # ABBA
        ebsqs_fifo.append(_drain_fifo(client, messages, _ebsqs_consume))
        plain_fifo.append(_drain_fifo(client, messages, _plain_consume))
        plain_fifo.append(_drain_fifo(client, messages, _plain_consume))
        ebsqs_fifo.append(_drain_fifo(client, messages, _ebsqs_consume))
    fifo_e, fifo_p = statistics.median(ebsqs_fifo), statistics.median(plain_fifo)
    send_e, send_p, recv_e, recv_p = _claim_checks(client, s3, bucket, payloads)
    return [
        Result(
            f"FIFO drain ({GROUPS} groups), ebsqs worker / plain loop",
            fifo_e / fifo_p,
            ">= 0.8",
            f"{fifo_e:.0f} vs {fifo_p:.0f} msg/s",
        ),
        Result(
            "2 MB claim-check send, .delay() / plain dumps+put+send",
            send_e / send_p,
            None,
            f"{send_e:.1f} vs {send_p:.1f} msg/s",
        ),
        Result(
            "2 MB claim-check run, ebsqs worker / plain get+loads+delete loop",
            recv_e / recv_p,
            None,
            f"{recv_e:.1f} vs {recv_p:.1f} msg/s",
        ),
    ]


def _new_fifo(client: Any) -> tuple[str, str]:
    name = f"bench-{uuid.uuid4().hex[:12]}.fifo"
    broker = SQSBroker()
    broker.ensure_queue(
        name, QueueSettings(dead_letter_queue=name.replace(".fifo", "-dlq.fifo"), fifo=True)
    )
    broker.close()
    return name, client.get_queue_url(QueueName=name)["QueueUrl"]


def _drain_fifo(client: Any, count: int, consume: Callable[[str, str, int], None]) -> float:
    """Messages per second ``consume`` drains a pre-loaded FIFO queue of ``GROUPS`` groups at."""
    name, url = _new_fifo(client)
    bodies = [encode(Envelope(task=noop.name, args=(i,))) for i in range(count)]
    for start in range(0, count, 10):
        client.send_message_batch(
            QueueUrl=url,
            Entries=[
                {
                    "Id": str(i),
                    "MessageBody": body,
                    "MessageGroupId": f"g{(start + i) % GROUPS}",
                    "MessageDeduplicationId": uuid.uuid4().hex,
                }
                for i, body in enumerate(bodies[start : start + 10])
            ],
        )
    return count / consume(name, url, count)


def _plain_consume(name: str, url: str, count: int) -> float:
    client: Any = boto3.client("sqs")
    client.get_queue_attributes(QueueUrl=url)  # connected, as the worker is after its start
    started = time.perf_counter()
    done = 0
    while done < count:
        done += _plain_batch(client, url, lambda message: json.loads(message["Body"]))
    return time.perf_counter() - started


def _plain_batch(client: Any, url: str, run: Callable[[Any], object]) -> int:
    """The plain loop's step: receive up to ten, ``run`` each, delete them in one request."""
    messages = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
        "Messages", []
    )
    for message in messages:
        run(message)
    if messages:
        client.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )
    return len(messages)


def _ebsqs_consume(name: str, url: str, count: int) -> float:
    settings = load_settings(broker_url="sqs://", auto_create_queues=False)
    worker = Worker(
        SQSBroker(),
        settings,
        InlineExecutor(),
        WorkerOptions(queues=(name,), wait_seconds=1),
    )
    return _run_worker(worker, count)


def _run_worker(worker: Worker, count: int) -> float:
    """Start ``worker`` and loop until it ran ``count`` tasks; return the seconds that took
    after the start. Any failure is a broken bench."""
    worker.start()
    started = time.perf_counter()
    try:
        while (done := worker.counters.total("succeeded")) < count:
            worker.loop_once()
            failed = worker.counters.total("failed") + worker.counters.total("dead_lettered")
            if failed:
                raise RuntimeError(f"{failed} benchmark task(s) failed after {done} succeeded")
    finally:
        elapsed = time.perf_counter() - started
        worker.stop()
        worker.drain()
    return elapsed


def _claim_checks(client: Any, s3: Any, bucket: str, count: int) -> tuple[float, ...]:
    """(ebsqs send, plain send, ebsqs run, plain run) in messages per second."""
    settings = load_settings(broker_url="sqs://", large_payload_bucket=bucket)
    producer.broker_for.cache_clear()
    data = "x" * PAYLOAD_CHARS
    ebsqs_queue, _ = _new_standard(client)
    _, plain_url = _new_standard(client)
    options = producer.SendOptions(queue_name=ebsqs_queue)
    # Warm both sides' clients (one message each, run too) so start-up is not measured.
    producer.send_now(carry, [producer.Call((-1, data))], options, settings=settings)
    s3.put_object(Bucket=bucket, Key="warm", Body=b"{}")
    client.send_message(QueueUrl=plain_url, MessageBody=json.dumps([bucket, "warm"]))
    started = time.perf_counter()
    for i in range(count):
        producer.send_now(carry, [producer.Call((i, data))], options, settings=settings)
    send_e = count / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(count):
        # A plain program serialises its arguments too (json.dumps, as ebsqs does).
        body = json.dumps({"task": carry.name, "args": [i, data]}, ensure_ascii=False)
        key = f"plain/{uuid.uuid4().hex}"
        s3.put_object(Bucket=bucket, Key=key, Body=body.encode())
        pointer = json.dumps([bucket, key])
        client.send_message(QueueUrl=plain_url, MessageBody=pointer)
    send_p = count / (time.perf_counter() - started)

    worker = Worker(
        SQSBroker(),
        settings,
        InlineExecutor(),
        WorkerOptions(queues=(ebsqs_queue,), wait_seconds=1),
    )
    recv_e = (count + 1) / _run_worker(worker, count + 1)
    started = time.perf_counter()
    done = 0
    while done < count + 1:
        done += _plain_batch(client, plain_url, lambda message: _plain_fetch(s3, message))
    recv_p = (count + 1) / (time.perf_counter() - started)
    producer.broker_for.cache_clear()
    return send_e, send_p, recv_e, recv_p


def _plain_fetch(s3: Any, message: Any) -> None:
    """Fetch, parse and delete the object a plain pointer names."""
    where, key = json.loads(message["Body"])
    json.loads(s3.get_object(Bucket=where, Key=key)["Body"].read().decode())
    s3.delete_object(Bucket=where, Key=key)


def _new_standard(client: Any) -> tuple[str, str]:
    name = f"bench-{uuid.uuid4().hex[:12]}"
    broker = SQSBroker()
    broker.ensure_queue(name, QueueSettings(dead_letter_queue=f"{name}-dlq"))
    broker.close()
    return name, client.get_queue_url(QueueName=name)["QueueUrl"]

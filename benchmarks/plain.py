"""The baseline: what a plain boto3 program does to move the same messages, and nothing more.

``python -m benchmarks.plain consume QUEUE_URL COUNT`` runs the consumer loop in its own
process, so it can be measured from outside exactly as an ``ebsqs worker`` is: receive ten with
a long poll, parse each body and call a no-op, delete the ten with one ``delete_message_batch``,
until COUNT messages are deleted. The endpoint and credentials come from the environment, as
they do for ``ebsqs``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import boto3


def _noop(*args: Any, **kwargs: Any) -> None:
    """The plain loop's task."""


def consume(queue_url: str, count: int, wait_seconds: int = 20) -> None:
    """Receive, run and delete ``count`` messages, ten at a time."""
    consume_with(boto3.client("sqs"), queue_url, count, wait_seconds)


def consume_with(client: Any, queue_url: str, count: int, wait_seconds: int = 20) -> None:
    """:func:`consume` with a client of the caller's."""
    done = 0
    while done < count:
        response = client.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds
        )
        messages = response.get("Messages", [])
        if not messages:
            continue
        for message in messages:
            body = json.loads(message["Body"])
            _noop(*body.get("args", ()), **body.get("kwargs", {}))
        client.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
            ],
        )
        done += len(messages)


def send(client: Any, queue_url: str, bodies: Sequence[str]) -> None:
    """Send ``bodies`` with ``send_message_batch``, ten per call, one call after another."""
    for start in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies[start : start + 10])
        ]
        response = client.send_message_batch(QueueUrl=queue_url, Entries=entries)
        if response.get("Failed"):
            raise RuntimeError(f"send_message_batch failed: {response['Failed'][:3]}")


def main(argv: Sequence[str]) -> None:
    if len(argv) != 3 or argv[0] != "consume":
        raise SystemExit("usage: python -m benchmarks.plain consume QUEUE_URL COUNT")
    consume(argv[1], int(argv[2]))


if __name__ == "__main__":
    main(sys.argv[1:])

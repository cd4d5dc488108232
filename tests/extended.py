"""AWS's SQS Extended Client (``amazon-sqs-extended-client``), imported without its side effect.

Importing ``sqs_extended_client`` replaces ``boto3.session.Session`` (and ``boto3.Session``, and
the default session) for the whole process, turning every SQS client made afterwards into an
Extended Client. Tests take its session class from :func:`session_class`, which puts boto3
back, so the order tests run in (or how they are spread over processes) changes nothing.
"""

from __future__ import annotations

from typing import Any

import boto3


def session_class() -> Any:
    """``SQSExtendedClientSession``, with boto3 as it was before the package's import."""
    saved = boto3.session.Session, boto3.Session, boto3.DEFAULT_SESSION
    try:
        from sqs_extended_client.client import SQSExtendedClientSession
    finally:
        boto3.session.Session, boto3.Session, boto3.DEFAULT_SESSION = saved  # type: ignore[misc]
    return SQSExtendedClientSession

"""Brokers, chosen by URL: ``sqs://``, ``sqlite:///path`` and ``memory://``.

``from_url`` builds a broker object but opens nothing: clients and connections are created
lazily, in the process (and after the fork) that uses them.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from ebsqs.brokers.base import (
    MAX_BATCH,
    MAX_DELAY_SECONDS,
    MAX_VISIBILITY_SECONDS,
    Broker,
    OutgoingMessage,
    QueueSettings,
    QueueStats,
    ReceivedMessage,
)
from ebsqs.errors import ConfigurationError

__all__ = [
    "MAX_BATCH",
    "MAX_DELAY_SECONDS",
    "MAX_VISIBILITY_SECONDS",
    "Broker",
    "OutgoingMessage",
    "QueueSettings",
    "QueueStats",
    "ReceivedMessage",
    "from_url",
]

SCHEMES = ("sqs", "sqlite", "memory")


def from_url(url: str) -> Broker:
    """Build the broker a URL names.

    Args:
        url: ``sqs://`` (standard AWS credential chain and region; ``sqs://eu-west-1`` pins the
            region; the endpoint comes from ``AWS_ENDPOINT_URL_SQS`` / ``AWS_ENDPOINT_URL``),
            ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``, or
            ``memory://`` (``memory://name`` shares one in-process store per name).

    Raises:
        ConfigurationError: the URL names no broker ebsqs knows.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqs":
        from ebsqs.brokers.sqs import SQSBroker

        options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        return SQSBroker(region=parts.netloc or options.get("region") or None)
    if scheme == "sqlite":
        from ebsqs.brokers.sqlite import SQLiteBroker

        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(
                f"broker URL {url!r} has no file path; use sqlite:///relative.db or "
                "sqlite:////absolute/path.db"
            )
        return SQLiteBroker(path)
    if scheme == "memory":
        from ebsqs.brokers.memory import MemoryBroker

        return MemoryBroker.named(parts.netloc or "default")
    raise ConfigurationError(
        f"unknown broker URL {url!r}: the scheme must be one of "
        + ", ".join(f"{s}://" for s in SCHEMES)
    )

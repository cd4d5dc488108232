"""Brokers, chosen by URL: ``sqs://``, ``sqlite:///path`` and ``memory://``.

``from_url`` builds a broker object but opens nothing: clients and connections are created
lazily, in the process (and after the fork) that uses them.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from urllib.parse import urlsplit

from ebsqs import plugins
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
    "schemes",
]

GROUP = "ebsqs.brokers"

#: The built-in brokers by URL scheme, found even when the package's entry points are not
#: installed. A broker class has a ``from_url(url)`` class method that builds it (opening
#: nothing); a third-party broker registers its class under the entry-point group
#: ``ebsqs.brokers``, named by its scheme.
BUILTIN = {
    "sqs": "ebsqs.brokers.sqs:SQSBroker",
    "sqlite": "ebsqs.brokers.sqlite:SQLiteBroker",
    "memory": "ebsqs.brokers.memory:MemoryBroker",
}


def schemes() -> list[str]:
    """Every URL scheme a broker is registered for."""
    return plugins.names(GROUP, BUILTIN)


def from_url(url: str) -> Broker:
    """Build the broker a URL names.

    Args:
        url: ``sqs://`` (standard AWS credential chain and region; ``sqs://eu-west-1`` pins the
            region; the endpoint comes from ``AWS_ENDPOINT_URL_SQS`` / ``AWS_ENDPOINT_URL``),
            ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``,
            ``memory://`` (``memory://name`` shares one in-process store per name), or the
            scheme of a broker plugin.

    Raises:
        ConfigurationError: the URL names no broker ebsqs knows, or the broker refuses it.
    """
    scheme = urlsplit(url).scheme.lower()
    if not scheme or scheme not in schemes():
        raise ConfigurationError(
            f"unknown broker URL {url!r}: the scheme must be one of "
            + ", ".join(f"{s}://" for s in schemes())
        )
    broker: Broker = plugins.load(GROUP, scheme, BUILTIN, "broker").from_url(url)
    return broker


def prepared(url: str, factory: Callable[[str], Broker] = from_url) -> Broker:
    """The broker of ``url`` with its clients built now, in this thread, and nothing asked of
    the queue: for a thread of a master that forks (the depth sampler, the periodic scheduler,
    the outbox's relay).

    A lock a thread holds at a fork stays held in the child for good. boto3 takes Python's
    module import locks while it builds a client, and a first connection looks up the idna
    codec under its module lock (a child forked meanwhile was seen waiting forever): both are
    done here, before the thread that uses the broker starts or under its fork guard.
    """
    codecs.lookup("idna")
    broker = factory(url)
    clients = getattr(broker, "clients", None)  # the SQS broker's boto3 clients
    if callable(clients):
        clients()
    return broker

"""Shared fixtures. Helpers live in ``tests/servers.py`` and ``tests/waiting.py``; only fixtures
go here.

- ``moto_server`` / ``fauxqs_server`` (session): a local SQS server's endpoint URL.
- ``sqs_env``: points boto3 at moto for one test (``indirect``-parametrize with ``"fauxqs"``
  for fauxqs) and returns the endpoint; subprocesses get ``servers.subprocess_env(endpoint)``.
- ``unique_queue``: a factory of queue names no other test uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ebsqs.brokers.memory import MemoryBroker
from tests import servers


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's threaded SQS server on 127.0.0.1, for the whole session: its endpoint URL."""
    with servers.moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def fauxqs_server() -> Iterator[str]:
    """fauxqs on 127.0.0.1, for the whole session: its endpoint URL (skips if not installed)."""
    with servers.fauxqs_server() as endpoint:
        yield endpoint


@pytest.fixture
def sqs_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Set AWS_ENDPOINT_URL_SQS, region and dummy credentials for this test; return the endpoint.

    moto by default; ``@pytest.mark.parametrize("sqs_env", ["moto", "fauxqs"], indirect=True)``
    picks the server.
    """
    server = getattr(request, "param", "moto")
    endpoint: str = request.getfixturevalue(f"{server}_server")
    servers.apply_sqs_env(monkeypatch, endpoint)
    return endpoint


@pytest.fixture
def unique_queue(request: pytest.FixtureRequest) -> Callable[..., str]:
    """``unique_queue(fifo=False)`` -> a fresh queue name starting with the test's name."""

    def make(*, fifo: bool = False) -> str:
        return servers.unique_queue_name(request.node.name, fifo=fifo)

    return make


@pytest.fixture(autouse=True)
def _reset_memory_brokers() -> Iterator[None]:
    """Forget the named in-process stores (``memory://name``) after each test."""
    yield
    MemoryBroker.reset()

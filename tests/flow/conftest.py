"""Fixtures of flow control's tests: a store of each kind, a clean middleware list."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsqs import middleware
from ebsqs.flow import store as flow_store
from ebsqs.flow.store import FlowStore, HostStore
from tests.faults.conftest import rig  # noqa: F401 - the fault suite's rig, for the acceptance runs

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_answers() -> bool:
    """Whether a Redis server answers on 127.0.0.1:6379."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


needs_redis = pytest.mark.skipif(
    not redis_answers(), reason="no Redis answers on 127.0.0.1:6379 (apt-get install redis-server)"
)


@pytest.fixture(autouse=True)
def _clean_middleware_and_stores() -> Iterator[None]:
    """Tasks with flow options register a middleware; each test starts with the list it had."""
    kept = list(middleware.MIDDLEWARE)
    flow_store.store_for.cache_clear()
    flow_store.host_store.cache_clear()
    yield
    middleware.MIDDLEWARE[:] = kept
    flow_store.store_for.cache_clear()
    flow_store.host_store.cache_clear()


@pytest.fixture(params=["host", pytest.param("redis", marks=needs_redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FlowStore:
    """A host store in a fresh file, or the Redis store (keys made unique by the caller)."""
    if request.param == "host":
        return HostStore(tmp_path / "flow.sqlite3")
    return flow_store.store_for(REDIS_URL)


@pytest.fixture
def tag() -> str:
    """A fresh key prefix: a Redis store outlives the test."""
    return uuid.uuid4().hex[:12]

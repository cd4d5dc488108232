"""Fixtures of the fault suite: a :class:`~tests.faults.harness.Rig` per test.

fauxqs runs once per session (``fauxqs_server`` in ``tests/conftest.py``; it skips with a reason
where fauxqs is not installed); each test gets its own queue, chaos proxy and ledger, and every
process it started is killed at the end, by process group.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsqs import producer
from ebsqs.brokers.sqs import SQSBroker
from tests import servers
from tests.faults.harness import Rig
from tests.faults.ledger import Ledger
from tests.faults.proxy import ChaosProxy


@pytest.fixture
def rig(
    request: pytest.FixtureRequest,
    fauxqs_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Rig]:
    """fauxqs behind a fresh chaos proxy, a fresh queue (not yet created) and ledger."""
    servers.apply_sqs_env(monkeypatch, fauxqs_server)
    producer.broker_for.cache_clear()
    broker = SQSBroker()
    proxy = ChaosProxy(fauxqs_server, lifetime=300)
    the_rig = Rig(
        broker=broker,
        proxy=proxy,
        queue=servers.unique_queue_name(
            request.node.name, fifo=request.node.get_closest_marker("fifo") is not None
        ),
        tmp_path=tmp_path,
        ledger=Ledger(tmp_path / "ledger.txt"),
    )
    try:
        yield the_rig
    finally:
        the_rig.close()
        proxy.close()
        broker.close()
        producer.broker_for.cache_clear()

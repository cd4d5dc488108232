"""The metrics HTTP server on 127.0.0.1: what a Prometheus scrape gets."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from ebsqs.counters import Counters, TaskStats
from ebsqs.ops.metrics import CONTENT_TYPE, Metrics, MetricsServer
from ebsqs.supervisor.snapshot import MasterState, SupervisorSnapshot
from tests import prometheus


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    registry = Metrics()
    server = MetricsServer(registry.render, port=0)
    server.bind()
    server.serve()
    try:
        yield registry, server
    finally:
        server.stop()


@pytest.mark.timeout(20)
def test_a_scrape_gets_the_latest_snapshot_s_text(served: tuple[Metrics, MetricsServer]) -> None:
    registry, server = served
    counts = {"a": Counters(tasks={"t": TaskStats(succeeded=7)})}
    registry.update(SupervisorSnapshot(1, MasterState.RUNNING, 1.0, {"a": 1}, (), counts, 0, 0))
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(server.url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        samples = prometheus.parse(response.read().decode())
    assert prometheus.value(samples, "ebsqs_tasks_succeeded_total", queue="a", task="t") == 7


@pytest.mark.timeout(20)
def test_other_paths_are_not_found(served: tuple[Metrics, MetricsServer]) -> None:
    _, server = served
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/admin", timeout=5)
    assert raised.value.code == 404


@pytest.mark.timeout(20)
def test_a_port_in_use_fails_at_bind(served: tuple[Metrics, MetricsServer]) -> None:
    _, server = served
    with pytest.raises(OSError):
        MetricsServer(lambda: "", port=server.port).bind()

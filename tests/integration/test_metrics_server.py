"""The metrics HTTP server on 127.0.0.1: what a Prometheus scrape gets."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from ebsqs.stats import TaskStats
from ebsqs.supervisor.metrics import CONTENT_TYPE, ChildReport, MetricsRegistry, MetricsServer
from tests import prometheus


@pytest.fixture
def served() -> Iterator[tuple[MetricsRegistry, MetricsServer]]:
    registry = MetricsRegistry(["a"])
    server = MetricsServer(registry.render, port=0)
    server.bind()
    server.serve()
    try:
        yield registry, server
    finally:
        server.stop()


@pytest.mark.timeout(20)
def test_a_scrape_gets_the_registry_s_text(served: tuple[MetricsRegistry, MetricsServer]) -> None:
    registry, server = served
    registry.report(1, ChildReport("a", tasks={"t": TaskStats(succeeded=7)}))
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(server.url, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        samples = prometheus.parse(response.read().decode())
    assert prometheus.value(samples, "ebsqs_tasks_succeeded_total", queue="a", task="t") == 7


@pytest.mark.timeout(20)
def test_other_paths_are_not_found(served: tuple[MetricsRegistry, MetricsServer]) -> None:
    _, server = served
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/admin", timeout=5)
    assert raised.value.code == 404


@pytest.mark.timeout(20)
def test_a_port_in_use_fails_at_bind(served: tuple[MetricsRegistry, MetricsServer]) -> None:
    _, server = served
    with pytest.raises(OSError):
        MetricsServer(lambda: "", port=server.port).bind()

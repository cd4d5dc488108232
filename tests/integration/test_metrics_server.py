"""The metrics HTTP server on 127.0.0.1: what a Prometheus scrape gets, from a registry and
from a live ``ebsqs supervise`` on fauxqs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsqs.brokers import OutgoingMessage
from ebsqs.counters import Counters, TaskStats
from ebsqs.ops import status
from ebsqs.ops.metrics import CONTENT_TYPE, Metrics, MetricsServer
from ebsqs.supervisor.snapshot import MasterState, SupervisorSnapshot
from tests import prometheus, servers
from tests.integration.processes import APP, EBSQS, Backend
from tests.waiting import wait_until


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


def _scrape(port: int) -> dict[prometheus.Key, float]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return prometheus.parse(response.read().decode())
    except OSError:  # not serving yet
        return {}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", ["fauxqs"], indirect=True)
def test_a_live_supervisor_serves_queue_and_dead_letter_depth(
    backend: Backend, tmp_path: Path
) -> None:
    queue = "depth"
    backend.create(queue)
    physical = backend.settings.physical_queue(queue)
    # Waiting where the child cannot take them: delayed sends, and dead letters.
    backend.broker.send_batch(
        physical, [OutgoingMessage(f"later-{i}", delay=900) for i in range(3)]
    )
    backend.broker.send_batch(
        backend.dead_letter_queue(queue), [OutgoingMessage(f"dead-{i}") for i in range(2)]
    )
    port = servers.free_port()
    status_file = tmp_path / "status.json"
    args = ["supervise", "--app", APP, "--queues", f"{queue}:1", "--wait", "1"]
    args += ["--metrics-port", str(port), "--status-file", str(status_file)]
    with open(tmp_path / "supervise.log", "ab") as log:
        process = subprocess.Popen(
            [*EBSQS, *args],
            cwd=servers.ROOT,
            env={**backend.env, "EBSQS_LOG_FORMAT": "json"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def depth_shown() -> dict[prometheus.Key, float] | None:
            samples = _scrape(port)
            delayed = prometheus.value(
                samples, "ebsqs_queue_messages", queue=queue, state="delayed"
            )
            dead = prometheus.value(samples, "ebsqs_dead_letter_messages", queue=queue)
            return samples if (delayed, dead) == (3, 2) else None

        samples = wait_until(
            depth_shown,
            30,
            interval=0.1,
            message=lambda: f"{_scrape(port)}\n{(tmp_path / 'supervise.log').read_text()[-2000:]}",
        )
        assert prometheus.value(samples, "ebsqs_queue_messages", queue=queue, state="visible") == 0
        assert prometheus.value(samples, "ebsqs_queue_depth_stale", queue=queue) == 0
        assert (
            prometheus.value(samples, "ebsqs_queue_depth_sampled_timestamp_seconds", queue=queue)
            > 0
        )
        assert prometheus.value(samples, "ebsqs_child_kills_total", queue=queue, reason="hung") == 0
        assert (
            "ebsqs_child_kills_total",
            frozenset({("queue", queue), ("reason", "hung")}),
        ) in samples
        assert ("ebsqs_child_restarts_total", frozenset({("queue", queue)})) in samples

        def status_shows_depth() -> bool:
            if not status_file.exists():
                return False
            shown = status.read_status(status_file).get("queues", {}).get(queue, {})
            return (shown.get("delayed"), shown.get("dead_letters")) == (3, 2)

        wait_until(status_shows_depth, 10, message=lambda: status_file.read_text())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

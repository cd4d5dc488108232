"""The benchmarks' counting proxy with latency: each request waits on the way in and out, and
concurrent requests wait side by side. The upstream is a stub HTTP server in this process."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from benchmarks.counting_proxy import Latency, counting_proxy

pytestmark = pytest.mark.timeout(30)

DELAY = 0.05


class _Answer(BaseHTTPRequestHandler):
    """Answers every POST at once with a small JSON body, as SQS's JSON protocol does."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Silent."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Backlogged(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # not 5: ten connections at once must not see SYNs dropped


@contextmanager
def _upstream() -> Iterator[str]:
    server = _Backlogged(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _call(url: str, action: str = "ReceiveMessage") -> float:
    """One request on its own connection; the seconds it took."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    started = time.monotonic()
    try:
        connection.request("POST", "/", body=b"{}", headers={"X-Amz-Target": f"AmazonSQS.{action}"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.read() == b"{}"
    finally:
        connection.close()
    return time.monotonic() - started


def test_a_request_waits_the_delay_each_way_and_is_counted() -> None:
    with _upstream() as upstream, counting_proxy(upstream, delay=DELAY) as (proxy, counter):
        seconds = _call(proxy, "DeleteMessageBatch")

    assert seconds >= 2 * DELAY
    assert counter.snapshot() == {"DeleteMessageBatch": 1}


def test_concurrent_requests_wait_side_by_side() -> None:
    with _upstream() as upstream, counting_proxy(upstream, delay=DELAY) as (proxy, counter):
        started = time.monotonic()
        with ThreadPoolExecutor(10) as pool:
            each = list(pool.map(lambda _: _call(proxy), range(10)))
        seconds = time.monotonic() - started

    # One after another they would take 10 x 100 ms; side by side about 100 ms. The bound is
    # generous because the machine is shared.
    assert min(each) >= 2 * DELAY
    assert seconds < 0.5 * 10 * 2 * DELAY
    assert counter.snapshot() == {"ReceiveMessage": 10}


def test_jitter_never_waits_a_negative_time() -> None:
    started = time.monotonic()
    for _ in range(20):
        Latency(delay=0.0, jitter=0.001).wait()  # half the draws are below zero

    assert time.monotonic() - started < 1.0

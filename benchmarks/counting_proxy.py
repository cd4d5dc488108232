"""An HTTP proxy that counts SQS requests by action and can add SQS's latency.

It sits between an unmodified ``ebsqs worker`` (or any boto3 program) and the SQS server:
point ``AWS_ENDPOINT_URL_SQS`` at it. Counting on the wire, as SQS bills, needs no hook inside
the measured process and sees every request, retries included.

With ``delay``, each request waits that long on the way in and again on the way out, so a local
server answers like real SQS (10-20 ms a round trip). Each client connection has its own thread
and its own upstream connection, so concurrent requests wait side by side, not in turn. The
proxy itself costs time even at ``delay=0``: throughput is compared only between consumers that
all go through it.
"""

from __future__ import annotations

import http.client
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

#: Headers that belong to one hop, never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
    }
)


class RequestCounter:
    """Counts per SQS action (``ReceiveMessage``...), safe across the proxy's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, action: str) -> None:
        with self._lock:
            self._counts[action] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


@dataclass(frozen=True, slots=True)
class Latency:
    """Seconds added each way of every request: ``delay`` plus or minus up to ``jitter``."""

    delay: float = 0.0
    jitter: float = 0.0

    def wait(self) -> None:
        """Sleep one way's worth (never a negative time)."""
        seconds = self.delay + (random.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        if seconds > 0:
            time.sleep(seconds)


class _Upstream:
    """One client connection's own connection to the server, so no request waits for another's."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._connection: http.client.HTTPConnection | None = None

    def ask(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """The response and its body; sent once more on a new connection if the server closed
        the kept-alive one in the meantime."""
        reused = self._connection is not None
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self._host, self._port, timeout=60)
        try:
            self._connection.request(method, path, body=body, headers=headers)
            response = self._connection.getresponse()
            return response, response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.close()
            if not reused:
                raise
            return self.ask(method, path, body, headers)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _handler(
    upstream: str, counter: RequestCounter, latency: Latency
) -> type[BaseHTTPRequestHandler]:
    parts = urlsplit(upstream)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
        # and the client's delayed ACK hold each response back by ~40 ms.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            self._upstream = _Upstream(host, port)

        def log_message(self, format: str, *args: object) -> None:
            """Silent."""

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            target = self.headers.get("X-Amz-Target", "")
            counter.add(target.rsplit(".", 1)[-1] if target else f"{self.command} {self.path}")
            latency.wait()  # on the way in
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            response, payload = self._upstream.ask(self.command, self.path, body, headers)
            latency.wait()  # on the way out
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_POST = do_GET = _forward

        def finish(self) -> None:
            """The client's connection is done: close this thread's upstream one too."""
            super().finish()
            self._upstream.close()

    return Forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5: a burst of new connections on a busy machine had
    # some SYNs dropped, and retried only a second later.
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet when a client goes away mid-request (a consumer killed at the end of a run)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def counting_proxy(
    upstream: str, delay: float = 0.0, jitter: float = 0.0
) -> Iterator[tuple[str, RequestCounter]]:
    """Run the proxy on 127.0.0.1 (a free port); yield its URL and its counter.

    Args:
        upstream: the SQS server's URL.
        delay: seconds added on the way in and again on the way out of each request (0.015
            makes a round trip of about 30 ms, like real SQS).
        jitter: each wait is ``delay`` plus or minus up to this many seconds, uniformly.
    """
    counter = RequestCounter()
    latency = Latency(delay, jitter)
    server = _Server(("127.0.0.1", 0), _handler(upstream, counter, latency))
    thread = threading.Thread(target=server.serve_forever, name="counting-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counter
    finally:
        server.shutdown()
        server.server_close()

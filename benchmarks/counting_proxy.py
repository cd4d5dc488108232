"""An HTTP proxy that counts SQS requests by action, for "requests per task".

It sits between an unmodified ``ebsqs worker`` (or any boto3 program) and the SQS server:
point ``AWS_ENDPOINT_URL_SQS`` at it. Counting on the wire, as SQS bills, needs no hook inside
the measured process and sees every request, retries included. It adds latency, so throughput
is never measured through it.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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


def _handler(upstream: str, counter: RequestCounter) -> type[BaseHTTPRequestHandler]:
    parts = urlsplit(upstream)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
        # and the client's delayed ACK hold each response back by ~40 ms.
        disable_nagle_algorithm = True
        _upstream: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: object) -> None:
            """Silent."""

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            target = self.headers.get("X-Amz-Target", "")
            counter.add(target.rsplit(".", 1)[-1] if target else f"{self.command} {self.path}")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(host, port, timeout=60)
            self._upstream.request(self.command, self.path, body=body, headers=headers)
            response = self._upstream.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_POST = do_GET = _forward

    return Forward


@contextmanager
def counting_proxy(upstream: str) -> Iterator[tuple[str, RequestCounter]]:
    """Run the proxy on 127.0.0.1 (a free port); yield its URL and its counter."""
    counter = RequestCounter()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(upstream, counter))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="counting-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", counter
    finally:
        server.shutdown()
        server.server_close()

"""A chaos proxy between ebsqs and a local SQS server (fauxqs), for the fault suite.

SQS's JSON protocol names the operation in the ``X-Amz-Target`` header
(``AmazonSQS.ReceiveMessage``), so the proxy can fault one operation and pass the others. Point
ebsqs at it with ``AWS_ENDPOINT_URL_SQS=proxy.endpoint``. A test programs it while traffic flows;
every method is thread-safe::

    with ChaosProxy(fauxqs_endpoint) as proxy:
        proxy.inject("ReceiveMessage", THROTTLED, rate=0.5, seconds=5)
        proxy.drop("DeleteMessageBatch", forward=True, count=3)   # lost acks
        proxy.blackhole(4)                                        # accept, never answer
        proxy.refuse(2)                                           # connection refused
        proxy.latency(0.2, "SendMessageBatch")
        proxy.requests["ReceiveMessage"]                          # requests seen

Faults:

- *refuse*: the listening socket is closed, so connecting gets ``ECONNREFUSED``; requests on
  connections already open are reset without an answer.
- *blackhole*: connections are accepted and requests read, but nothing is forwarded or answered
  until the blackhole ends; then the connection is closed unanswered (what a client sees after a
  partition heals, unless its read timeout fired first).
- *answer*: answer an operation with a JSON body of the test's making (batch entries that
  fail as only real SQS makes them fail), never forwarding it.
- *inject*: answer an operation with an SQS error (JSON body with ``__type``, and the
  ``x-amzn-query-error`` header SQS adds for query-compatible clients), never forwarding it.
- *drop*: forward the request (``forward=True``: the server acts, the client never hears, a lost
  ack) or swallow it (``forward=False``: it never reaches the server), then reset the connection.
- *latency*: sleep before forwarding, or (``after=True``) hold the server's answer.

The proxy only ever connects to 127.0.0.1, and stops by itself after ``lifetime`` seconds so a
test that forgets it leaves nothing running.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import select
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "INTERNAL_ERROR",
    "KMS_THROTTLED",
    "OVER_LIMIT",
    "SERVICE_UNAVAILABLE",
    "THROTTLED",
    "ChaosProxy",
    "SqsError",
]

LOOPBACK = "127.0.0.1"
#: Seconds the proxy waits for the server: longer than a 20-second long poll.
UPSTREAM_TIMEOUT = 40.0
#: How often waiting threads look again at the faults and at the stop flag.
TICK = 0.02

#: Builds a response's JSON from a request's JSON (see :meth:`ChaosProxy.answer`).
Responder = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class SqsError:
    """An error response as SQS sends it over the JSON protocol.

    Attributes:
        code: the JSON ``__type`` name (after ``com.amazonaws.sqs#``).
        query_code: the query-protocol code in ``x-amzn-query-error``, which botocore reports
            as the error code for SQS (a query-compatible service).
        status: the HTTP status.
        sender_fault: ``Sender`` or ``Receiver`` in ``x-amzn-query-error``.
    """

    code: str
    query_code: str
    status: int = 400
    sender_fault: bool = True

    def body(self) -> bytes:
        return json.dumps(
            {"__type": f"com.amazonaws.sqs#{self.code}", "message": f"injected {self.code}"}
        ).encode()

    def query_error(self) -> str:
        return f"{self.query_code};{'Sender' if self.sender_fault else 'Receiver'}"


THROTTLED = SqsError("RequestThrottled", "RequestThrottled")
OVER_LIMIT = SqsError("OverLimit", "OverLimit")
KMS_THROTTLED = SqsError("KmsThrottled", "KMS.ThrottlingException")
INTERNAL_ERROR = SqsError("InternalError", "InternalError", 500, sender_fault=False)
SERVICE_UNAVAILABLE = SqsError("ServiceUnavailable", "ServiceUnavailable", 503, False)


@dataclass
class _Rule:
    """One programmed fault on an operation (None: every operation)."""

    operation: str | None
    rate: float
    remaining: int | None
    until: float | None
    error: SqsError | None = None
    forward: bool = True
    respond: Responder | None = None

    def fires(self, operation: str, now: float, rng: random.Random) -> bool:
        """Whether this request is hit; counts it against ``remaining`` when it is."""
        if self.operation not in (None, operation) or self.spent(now):
            return False
        if rng.random() >= self.rate:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True

    def spent(self, now: float) -> bool:
        return (self.remaining is not None and self.remaining <= 0) or (
            self.until is not None and now >= self.until
        )


@dataclass(frozen=True)
class _Verdict:
    """What to do with one request."""

    error: SqsError | None = None
    respond: Responder | None = None
    drop: bool = False
    forward_before_drop: bool = True
    delay: float = 0.0
    hold: float = 0.0


class _Faults:
    """The programmed faults and the request counts, behind one lock."""

    def __init__(self, seed: int | None) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._errors: list[_Rule] = []
        self._drops: list[_Rule] = []
        self._latency: dict[str | None, float] = {}
        self._hold: dict[str | None, float] = {}
        self._refuse_until = 0.0
        self._blackhole_until = 0.0
        self.requests: Counter[str] = Counter()
        self.faulted: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()

    def add(self, kind: str, rule: _Rule) -> None:
        with self._lock:
            (self._errors if kind == "error" else self._drops).append(rule)

    def set_latency(self, seconds: float, operation: str | None, after: bool) -> None:
        with self._lock:
            (self._hold if after else self._latency)[operation] = seconds

    def counts(self, name: str) -> Counter[str]:
        """A copy of one of the counters (``requests``, ``faulted``, ``answered``)."""
        with self._lock:
            return Counter(getattr(self, name))

    def count_answer(self, operation: str) -> None:
        with self._lock:
            self.answered[operation] += 1

    def set_refuse(self, seconds: float) -> None:
        with self._lock:
            self._refuse_until = time.monotonic() + seconds

    def set_blackhole(self, seconds: float) -> None:
        with self._lock:
            self._blackhole_until = time.monotonic() + seconds

    def clear(self) -> None:
        with self._lock:
            self._errors.clear()
            self._drops.clear()
            self._latency.clear()
            self._hold.clear()
            self._refuse_until = self._blackhole_until = 0.0

    def refusing(self) -> bool:
        with self._lock:
            return time.monotonic() < self._refuse_until

    def blackholed(self) -> bool:
        with self._lock:
            return time.monotonic() < self._blackhole_until

    def decide(self, operation: str) -> _Verdict:
        """Count one request and decide its fate."""
        now = time.monotonic()
        with self._lock:
            self.requests[operation] += 1
            delay = self._latency.get(operation, self._latency.get(None, 0.0))
            hold = self._hold.get(operation, self._hold.get(None, 0.0))
            for rule in self._errors:
                if rule.fires(operation, now, self._rng):
                    self.faulted[operation] += 1
                    return _Verdict(error=rule.error, respond=rule.respond, delay=delay)
            for rule in self._drops:
                if rule.fires(operation, now, self._rng):
                    self.faulted[operation] += 1
                    return _Verdict(drop=True, forward_before_drop=rule.forward, delay=delay)
            return _Verdict(delay=delay, hold=hold)


class _Handler(BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1 keep-alive), forwarded to the server."""

    protocol_version = "HTTP/1.1"
    server: ChaosProxy  # type: ignore[assignment]
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request lines http.server writes to stderr."""

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        proxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2] or "?"
        if proxy.faults.refusing():
            return self._reset()
        if proxy.faults.blackholed():
            proxy.wait_while(proxy.faults.blackholed)
            return self._reset()
        verdict = proxy.faults.decide(operation)
        if verdict.delay:
            proxy.stopped.wait(verdict.delay)
        if verdict.error is not None:
            return self._answer_error(verdict.error)
        if verdict.respond is not None:
            return self._answer(200, json.dumps(verdict.respond(json.loads(body))).encode())
        if verdict.drop and not verdict.forward_before_drop:
            return self._reset()
        return self._pass_on(operation, body, verdict)

    def _pass_on(self, operation: str, body: bytes, verdict: _Verdict) -> None:
        """Forward the request and relay the answer (held or dropped as ``verdict`` says)."""
        status, headers, answer = self._forward(body)
        self.server.faults.count_answer(operation)
        if verdict.hold:
            self.server.stopped.wait(verdict.hold)
        if verdict.drop:
            return self._reset()  # the server acted; the client never hears
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(
                LOOPBACK, self.server.upstream_port, timeout=UPSTREAM_TIMEOUT
            )
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = f"{LOOPBACK}:{self.server.upstream_port}"
        try:
            self._upstream.request(self.command, self.path, body=body, headers=headers)
            self._await_answer(self._upstream)
            response = self._upstream.getresponse()
            return response.status, response.getheaders(), response.read()
        except (OSError, http.client.HTTPException):
            self._upstream.close()
            self._upstream = None
            return 502, [("Content-Type", "text/plain")], b"chaos proxy: upstream failed"

    def _await_answer(self, upstream: http.client.HTTPConnection) -> None:
        """Wait for the server's answer; if the client hangs up first, hang up on the server.

        A client that goes away during a long poll closes its TCP connection, and the server
        sees that; the proxy passes the hang-up on so it hides nothing from the server.

        Raises:
            ConnectionAbortedError: the client hung up.
        """
        watched = [upstream.sock, self.connection]
        while True:
            ready, _, _ = select.select(watched, [], [], TICK)
            if upstream.sock in ready:
                return
            if self.connection in ready:
                if not self.connection.recv(1, socket.MSG_PEEK):
                    raise ConnectionAbortedError("the client hung up before the answer")
                watched = [upstream.sock]  # it sent more (never with boto3): stop watching it

    def _answer_error(self, error: SqsError) -> None:
        self._answer(error.status, error.body(), {"x-amzn-query-error": error.query_error()})

    def _answer(self, status: int, answer: bytes, headers: dict[str, str] | None = None) -> None:
        """Answer in the proxy's own name, as SQS's JSON protocol does."""
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _reset(self) -> None:
        """Close the connection with a TCP reset, answering nothing."""
        self.close_connection = True
        self.server.reset(self.connection)

    def finish(self) -> None:
        super().finish()
        if self._upstream is not None:
            self._upstream.close()


class ChaosProxy:
    """An HTTP proxy on 127.0.0.1 (a free port) in front of an SQS server on 127.0.0.1.

    Args:
        upstream: the server's URL, e.g. ``http://127.0.0.1:40123`` (loopback only).
        lifetime: seconds after which the proxy stops by itself.
        seed: seeds the random choice of which requests a ``rate`` hits.

    Raises:
        ValueError: ``upstream`` is not an ``http://127.0.0.1:PORT`` URL.
    """

    def __init__(self, upstream: str, *, lifetime: float = 600.0, seed: int | None = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname != LOOPBACK or not parts.port:
            raise ValueError(f"the chaos proxy only forwards to http://{LOOPBACK}:PORT: {upstream}")
        self.upstream_port = parts.port
        self.faults = _Faults(seed)
        self.stopped = threading.Event()
        self._expires = time.monotonic() + lifetime
        self._listener: socket.socket | None = self._listen(0)
        self.port = int(self._listener.getsockname()[1])
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="chaos-proxy", daemon=True)
        self._thread.start()

    # -- programming it --

    @property
    def requests(self) -> Counter[str]:
        """Requests seen per operation (a copy)."""
        return self.faults.counts("requests")

    @property
    def faulted(self) -> Counter[str]:
        """Requests per operation that got an injected error or answer, or were dropped."""
        return self.faults.counts("faulted")

    def inject(
        self,
        operation: str | None,
        error: SqsError,
        *,
        rate: float = 1.0,
        count: int | None = None,
        seconds: float | None = None,
    ) -> None:
        """Answer ``operation`` (None: any) with ``error`` for a ``rate`` of its requests.

        Args:
            operation: e.g. ``"ReceiveMessage"``.
            error: the response, e.g. :data:`THROTTLED`.
            rate: the share of requests hit, from 0 to 1.
            count: stop after this many hits (None: no limit).
            seconds: stop after this long (None: until :meth:`clear`).
        """
        self.faults.add("error", self._rule(operation, rate, count, seconds, error=error))

    def answer(
        self,
        operation: str | None,
        respond: Responder,
        *,
        rate: float = 1.0,
        count: int | None = None,
        seconds: float | None = None,
    ) -> None:
        """Answer ``operation`` with ``respond(request)`` (HTTP 200), never forwarding it.

        For answers only a real SQS gives, such as batch entries failing with
        ``ReceiptHandleIsInvalid``.

        Args:
            respond: maps the request's JSON to the response's JSON.
            rate, count, seconds: as for :meth:`inject`.
        """
        rule = self._rule(operation, rate, count, seconds)
        rule.respond = respond
        self.faults.add("error", rule)

    def drop(
        self,
        operation: str | None,
        *,
        forward: bool = True,
        rate: float = 1.0,
        count: int | None = None,
        seconds: float | None = None,
    ) -> None:
        """Reset the connection instead of answering ``operation``.

        Args:
            forward: send the request on first (the server acts, the client never hears);
                False: the request never reaches the server.
            rate, count, seconds: as for :meth:`inject`.
        """
        self.faults.add("drop", self._rule(operation, rate, count, seconds, forward=forward))

    @staticmethod
    def _rule(
        operation: str | None,
        rate: float,
        count: int | None,
        seconds: float | None,
        error: SqsError | None = None,
        forward: bool = True,
    ) -> _Rule:
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be between 0 and 1, not {rate}")
        until = None if seconds is None else time.monotonic() + seconds
        return _Rule(operation, rate, count, until, error=error, forward=forward)

    def latency(self, seconds: float, operation: str | None = None, *, after: bool = False) -> None:
        """Delay every request of ``operation`` (None: any) by ``seconds``.

        Args:
            after: hold the server's answer instead of the request: the server has acted (a
                receive has handed out its messages) while the client still waits.
        """
        self.faults.set_latency(seconds, operation, after)

    @property
    def answered(self) -> Counter[str]:
        """Answers the server gave per operation (a copy), counted before any hold or drop."""
        return self.faults.counts("answered")

    def refuse(self, seconds: float) -> None:
        """Refuse connections for ``seconds``."""
        self.faults.set_refuse(seconds)

    def blackhole(self, seconds: float) -> None:
        """Accept connections and read requests, but answer nothing, for ``seconds``."""
        self.faults.set_blackhole(seconds)

    def down(self) -> bool:
        """Whether connections are refused or blackholed right now."""
        return self.faults.refusing() or self.faults.blackholed()

    def clear(self) -> None:
        """Remove every fault (request counts are kept)."""
        self.faults.clear()

    # -- running --

    def close(self) -> None:
        """Stop serving and close every connection."""
        self.stopped.set()
        self._thread.join(timeout=5)

    def serving(self) -> bool:
        """Whether the proxy's accept thread still runs."""
        return self._thread.is_alive()

    def __enter__(self) -> ChaosProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_while(self, condition: object) -> None:
        """Block a connection's thread while ``condition()`` holds and the proxy runs."""
        while callable(condition) and condition() and not self.stopped.wait(TICK):
            pass

    def reset(self, connection: socket.socket) -> None:
        """Close ``connection`` with a TCP reset (SO_LINGER 0)."""
        with contextlib.suppress(OSError):
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, port))
        listener.listen(128)
        return listener

    def _serve(self) -> None:
        """Accept connections until closed or expired; open and close the port for *refuse*."""
        try:
            while not self.stopped.is_set() and time.monotonic() < self._expires:
                if self.faults.refusing():
                    self._close_listener()
                    self.stopped.wait(TICK)
                    continue
                if self._listener is None:
                    self._listener = self._listen(self.port)
                ready, _, _ = select.select([self._listener], [], [], TICK)
                if ready:
                    connection, address = self._listener.accept()
                    threading.Thread(
                        target=self._connection, args=(connection, address), daemon=True
                    ).start()
        finally:
            self.stopped.set()
            self._close_listener()
            with self._open_lock:
                for connection in list(self._open):
                    self.reset(connection)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _connection(self, connection: socket.socket, address: tuple[str, int]) -> None:
        with self._open_lock:
            self._open.add(connection)
        try:
            _Handler(connection, address, self)  # type: ignore[arg-type]
        except OSError:
            pass  # the client went away, or the proxy reset the connection
        finally:
            with self._open_lock:
                self._open.discard(connection)
            _close(connection)


def _close(connection: socket.socket) -> None:
    """Close ``connection`` in order: what was written is still delivered."""
    with contextlib.suppress(OSError):  # already reset, or closed by the peer
        connection.shutdown(socket.SHUT_WR)
    connection.close()

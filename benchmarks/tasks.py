"""The benchmark app: tasks that do nothing, so a run measures the machinery around them."""

from __future__ import annotations

import os

from ebsqs import task

#: The environment variable naming :func:`record`'s ledger file.
LEDGER_VARIABLE = "BENCH_LEDGER"


@task
def noop(n: int) -> None:
    """Do nothing."""


@task
def carry(n: int, data: str) -> None:
    """Do nothing with a payload."""


@task
def record(n: int) -> None:
    """Append ``n`` as a line to the ledger file named by ``BENCH_LEDGER``, once per execution.

    One ``O_APPEND`` write per line, so lines from processes writing at once never interleave;
    the bench counts duplicates and gaps from the file afterwards.
    """
    fd = os.open(os.environ[LEDGER_VARIABLE], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{n}\n".encode())
    finally:
        os.close(fd)

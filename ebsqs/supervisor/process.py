"""Small operating-system helpers shared by the master and its children."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_setproctitle: Callable[[str], None] | None
try:
    from setproctitle import setproctitle as _setproctitle
except ImportError:  # optional: `pip install ebsqs[proctitle]`
    _setproctitle = None

_PR_SET_PDEATHSIG = 1


def set_title(title: str) -> None:
    """Set the process title shown by ps and top, when setproctitle is installed."""
    if _setproctitle is not None:
        _setproctitle(title)


def set_parent_death_signal(signum: int) -> bool:
    """Child side: ask the kernel to send ``signum`` when the parent dies (Linux only).

    Returns:
        True if the kernel accepted; elsewhere the child relies on its parent-pid check.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result: int = libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return result == 0


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a child ended: an exit code, or the signal that killed it."""

    code: int | None
    signal: int | None

    @classmethod
    def from_wait(cls, status: int) -> ExitStatus:
        """Decode the status ``os.waitpid`` returned."""
        code = os.waitstatus_to_exitcode(status)
        return cls(None, -code) if code < 0 else cls(code, None)

    def describe(self) -> dict[str, Any]:
        """Fields for a log line: ``exit_code`` or ``signal``."""
        if self.signal is not None:
            return {"signal": signal_name(self.signal)}
        return {"exit_code": self.code}

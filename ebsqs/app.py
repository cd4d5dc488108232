"""Loading the user's task modules (``--app``), the way gunicorn loads a WSGI app."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from ebsqs.errors import AppImportError


def load_app(modules: Sequence[str]) -> None:
    """Import every task module (which registers its tasks), with the cwd on ``sys.path``.

    Raises:
        AppImportError: a module failed to import; the message names it and the cause.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise AppImportError(
                f"cannot import task module {name!r}: {type(exc).__name__}: {exc}"
            ) from exc


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """``"a, b,c"`` (or repeated flags) as ``["a", "b", "c"]``: whitespace-tolerant."""
    if value is None:
        return []
    parts = [value] if isinstance(value, str) else list(value)
    return [item.strip() for part in parts for item in part.split(",") if item.strip()]

"""Finding a plugin by name: the built-in ones, then those of installed packages.

Executors (``ebsqs.executors``) and brokers (``ebsqs.brokers``) are both chosen by a name (an
executor's, a broker URL's scheme), looked up first among installed packages' entry points of
the group, then among the built-ins, so a third-party executor or broker is one package that
declares an entry point: nothing in ebsqs changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from ebsqs.errors import ConfigurationError


def names(group: str, builtin: Mapping[str, str]) -> list[str]:
    """Every name that can be chosen in ``group``."""
    return sorted(set(builtin) | {ep.name for ep in entry_points(group=group)})


def load(group: str, name: str, builtin: Mapping[str, str], kind: str) -> Any:
    """The object (``module:attribute``) registered as ``name`` in ``group``.

    Args:
        group: the entry-point group.
        name: what the user chose.
        builtin: name -> ``module:attribute`` of ebsqs's own, found even when the package's
            entry points are not installed (a checkout on ``sys.path``).
        kind: what it is, for error messages ("executor", "broker").

    Raises:
        ConfigurationError: nothing has that name, or it cannot be loaded.
    """
    target = {ep.name: ep.value for ep in entry_points(group=group)}.get(name) or builtin.get(name)
    if target is None:
        raise ConfigurationError(
            f"unknown {kind} {name!r}; choose one of: {', '.join(names(group, builtin))}"
        )
    module_name, _, attribute = target.partition(":")
    try:
        return getattr(import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"{kind} {name!r} ({target}) cannot be loaded: {exc}") from exc

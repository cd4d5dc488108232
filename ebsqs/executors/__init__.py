"""Executors, chosen by name: ``inline``, ``thread``, ``process``, ``asyncio``, or any
third-party one registered under the entry-point group ``ebsqs.executors``."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from ebsqs.errors import ConfigurationError
from ebsqs.executors.base import Executor
from ebsqs.registry import TaskRegistry, registry

__all__ = ["BUILTIN", "Executor", "available", "create"]

GROUP = "ebsqs.executors"

#: The built-in executors, found even when the package's entry points are not installed.
BUILTIN = {
    "inline": "ebsqs.executors.inline:InlineExecutor",
    "thread": "ebsqs.executors.thread:ThreadExecutor",
    "process": "ebsqs.executors.process:ProcessExecutor",
    "asyncio": "ebsqs.executors.asyncio:AsyncioExecutor",
}


def available() -> list[str]:
    """Names of every executor that can be chosen."""
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group=GROUP)})


def create(name: str, concurrency: int, registry: TaskRegistry = registry) -> Executor:
    """Build the executor of that name.

    Raises:
        ConfigurationError: no executor has that name, or it cannot be loaded.
    """
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
    target = {ep.name: ep.value for ep in entry_points(group=GROUP)}.get(name) or BUILTIN.get(name)
    if target is None:
        raise ConfigurationError(
            f"unknown executor {name!r}; choose one of: {', '.join(available())}"
        )
    module_name, _, attribute = target.partition(":")
    try:
        factory = getattr(import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"executor {name!r} ({target}) cannot be loaded: {exc}") from exc
    executor: Executor = factory(concurrency=concurrency, registry=registry)
    return executor

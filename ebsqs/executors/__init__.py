"""Executors, chosen by name: ``inline``, ``thread``, ``process``, ``asyncio``, or any
third-party one registered under the entry-point group ``ebsqs.executors``."""

from __future__ import annotations

from ebsqs import plugins
from ebsqs.errors import ConfigurationError
from ebsqs.executors.base import Capabilities, Executor
from ebsqs.registry import TaskRegistry, registry

__all__ = ["BUILTIN", "Capabilities", "Executor", "available", "create"]

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
    return plugins.names(GROUP, BUILTIN)


def create(name: str, concurrency: int, registry: TaskRegistry = registry) -> Executor:
    """Build the executor of that name.

    Raises:
        ConfigurationError: no executor has that name, or it cannot be loaded.
    """
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
    factory = plugins.load(GROUP, name, BUILTIN, "executor")
    executor: Executor = factory(concurrency=concurrency, registry=registry)
    return executor

"""``make bench``: start fauxqs on 127.0.0.1, run every benchmark module, print the ratios.

Usage: ``python -m benchmarks [--quick] [worker supervisor executors]``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence

from benchmarks import Result
from ebsqs import log
from tests import servers

#: Benchmark modules, in the order they run; each may not exist yet.
MODULES = ("worker", "supervisor", "executors", "fifo", "delays", "latency", "outbox")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a smoke-sized run")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(MODULES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if not servers.fauxqs_installed():
        print("fauxqs is not installed: run `make tools` (needs npm)", file=sys.stderr)
        return 2
    log.configure("console", "warning")  # this process sends too; keep its debug lines out
    print(f"ebsqs benchmarks on fauxqs; {platform.python_version()}, {os.cpu_count()} CPUs")
    with servers.fauxqs_server() as endpoint:
        os.environ.update(servers.sqs_env_vars(endpoint))
        for name in args.names or MODULES:
            run_module(name, endpoint, args.quick)
    return 0


def run_module(name: str, endpoint: str, quick: bool) -> None:
    """Run ``benchmarks.<name>`` if it exists, and print its table."""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"benchmarks.{name}":
            raise  # the module exists but something it imports does not
        print(f"\n{name}: not available")
        return
    print(f"\n{name}:", flush=True)
    started = time.monotonic()
    accepts_quick = "quick" in inspect.signature(module.run).parameters
    results = module.run(endpoint, quick=quick) if accepts_quick else module.run(endpoint)
    print_table(as_results(results))
    print(f"  ({time.monotonic() - started:.0f} s)")


def as_results(results: Sequence[Result] | Mapping[str, float]) -> list[Result]:
    """Results as a list; a plain ``{name: ratio}`` mapping is accepted too."""
    if isinstance(results, Mapping):
        return [Result(name, value) for name, value in results.items()]
    return list(results)


def print_table(results: Sequence[Result]) -> None:
    if not results:
        return
    width = max(len(result.name) for result in results)
    for result in results:
        verdict = {True: "ok", False: "MISSED", None: ""}[result.met]
        goal = f"goal {result.goal}" if result.goal else ""
        detail = f"  ({result.detail})" if result.detail else ""
        print(f"  {result.name:<{width}}  {result.value:6.2f}  {goal:<12} {verdict:<6}{detail}")


if __name__ == "__main__":
    sys.exit(main())

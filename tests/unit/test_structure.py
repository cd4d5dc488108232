"""The shape of the package: no import cycles, layers that point one way, light entry points.

Imports are read from the source (every ``import`` and ``from ... import`` of an ``ebsqs``
module, at module level or inside a function), so an import hidden in a function to dodge a
cycle counts as what it is. Imports under ``if TYPE_CHECKING:`` are left out: they never run.
A package's ``__init__`` running before its submodules is Python's doing, not an arrow of ours:
``from ebsqs import log`` is an arrow to ``ebsqs.log`` only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ebsqs"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _import_nodes(node)


def _resolve(name: str) -> str | None:
    """The ebsqs module an imported name lives in (a module, else its package)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """The ebsqs modules ``module`` imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # A submodule (``from ebsqs import log``) or else a name of the module ``base``.
            names = [
                full if (full := f"{base}.{alias.name}") in MODULES else base
                for alias in node.names
            ]
        for name in names:
            target = _resolve(name) if name.startswith("ebsqs") else None
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (as ``[a, b, ..., a]``), or ``[]`` when there is none."""
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        return list(exc.args[1])
    return []


def test_the_import_graph_is_read() -> None:
    """The control: the walk finds the arrows the design names, so an empty result means
    something."""
    assert "ebsqs.producer" in GRAPH["ebsqs.task"]
    assert "ebsqs.worker.settle" in GRAPH["ebsqs.worker.loop"]
    assert "ebsqs.supervisor.master" in GRAPH["ebsqs.cli"]  # inside `supervise`: still seen
    assert sorted(_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})[1:]) == ["a", "b", "c"]


def test_no_import_cycle_among_ebsqs_modules() -> None:
    assert _cycle(GRAPH) == []


# What each layer must never import: lower layers know nothing of the ones above them.
HIGHER = {
    "core": ("ebsqs.cli", "ebsqs.contrib", "ebsqs.ops", "ebsqs.supervisor"),
    "ebsqs.supervisor": ("ebsqs.cli", "ebsqs.contrib", "ebsqs.ops"),
    "ebsqs.ops": ("ebsqs.cli", "ebsqs.contrib", "ebsqs.supervisor.master"),
    # An application over ops (status documents) and the core, below the CLI that starts it;
    # only its Django publisher's lookup reaches into contrib, when Django is set up.
    "ebsqs.dashboard": ("ebsqs.cli", "ebsqs.supervisor.master"),
    # Schedules and the decorator are core-like; the scheduler is a master extension, so the
    # package sits beside the dashboard, over the supervisor's extension seam.
    "ebsqs.periodic": ("ebsqs.cli", "ebsqs.contrib", "ebsqs.ops", "ebsqs.supervisor.master"),
}


def _layer(module: str) -> str:
    for layer in (
        "ebsqs.supervisor",
        "ebsqs.ops",
        "ebsqs.contrib",
        "ebsqs.dashboard",
        "ebsqs.periodic",
    ):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "ebsqs.cli" if module in ("ebsqs.cli", "ebsqs.__main__") else "core"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_point_one_way(module: str) -> None:
    forbidden = HIGHER.get(_layer(module), ())
    wrong = sorted(t for t in GRAPH[module] if t.startswith(forbidden))
    assert wrong == [], f"{module} imports {wrong}"


def test_sending_has_one_home() -> None:
    """task -> producer -> envelope/broker: the producer never imports the task module."""
    assert "ebsqs.task" not in GRAPH["ebsqs.producer"]
    assert "ebsqs.task" not in GRAPH["ebsqs.envelope"]


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_importing_the_cli_does_not_import_the_supervisor_or_psutil() -> None:
    loaded = _modules_after("import ebsqs.cli")
    assert "ebsqs.cli" in loaded and "ebsqs.ops.cli" in loaded
    assert "ebsqs.supervisor.master" not in loaded
    assert "psutil" not in loaded


def test_importing_ebsqs_imports_no_client_library() -> None:
    loaded = _modules_after("import ebsqs")
    tops = {name.split(".")[0] for name in loaded}
    assert not tops & {"boto3", "botocore", "django", "opentelemetry", "psutil", "structlog"}


def test_delay_imports_no_tracing_library_unless_tracing_is_installed() -> None:
    """``ebsqs[otel]`` is installed here: sending still loads none of it until the application
    calls ``ebsqs.tracing.install()``."""
    send = (
        "import os; os.environ['EBSQS_BROKER_URL'] = 'memory://structure'; "
        "from ebsqs import task; task(name='light')(lambda: None).delay()"
    )
    loaded = _modules_after(send)
    assert "ebsqs.producer" in loaded
    assert not {name for name in loaded if name.split(".")[0] == "opentelemetry"}
    assert "ebsqs.tracing" not in loaded
    traced = _modules_after(f"import ebsqs.tracing; ebsqs.tracing.install(); {send}")
    assert "opentelemetry.trace" in traced  # the control: the check can fail

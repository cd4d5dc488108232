"""HUP's re-import of the app, in this process (no fork needed to show the module bookkeeping)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsqs.registry import registry
from ebsqs.supervisor.reload import import_app, reimport_app

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``top/`` (a package) holding ``mid/`` (a namespace package) holding ``tasks.py``."""
    (tmp_path / "top" / "mid").mkdir(parents=True)
    (tmp_path / "top" / "__init__.py").write_text("")
    (tmp_path / "top" / "mid" / "tasks.py").write_text(
        "from ebsqs import task\n\n@task(name='reload.t')\ndef t():\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [n for n in sys.modules if n == "top" or n.startswith("top.")]:
        del sys.modules[name]
    registry._tasks.pop("reload.t", None)


def test_reimport_takes_fresh_code_through_a_namespace_package(app_dir: Path) -> None:
    modules = import_app(["top.mid.tasks"])
    assert {"top", "top.mid", "top.mid.tasks"} <= modules
    assert registry.get("reload.t").fn() == 1
    # Another size, so a .pyc written within the same second cannot pass for the new source.
    (app_dir / "top" / "mid" / "tasks.py").write_text(
        "from ebsqs import task\n\n@task(name='reload.t')\ndef t():\n    return 222\n"
    )
    reimport_app(["top.mid.tasks"], modules)
    assert registry.get("reload.t").fn() == 222

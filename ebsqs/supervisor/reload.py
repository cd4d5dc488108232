"""Fresh code on HUP without giving up copy-on-write at start.

The master imports the app once, before the first fork, so the first children share its pages.
It never imports again: a reload (HUP) only raises the generation, and each child of a newer
generation drops the app's own modules from its inherited ``sys.modules`` and imports them from
disk, after the fork. The master's memory, and every module outside the app (the standard
library, site-packages, ebsqs itself), stay shared.
"""

from __future__ import annotations

import importlib
import os
import site
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from types import ModuleType

from ebsqs.app import load_app

_EBSQS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_app(apps: Sequence[str]) -> frozenset[str]:
    """Master side, once: import the task modules; return the names of the app's own modules.

    Those are the modules the import loaded from outside the standard library, site-packages
    and ebsqs: the code a deploy changes, which a reload imports afresh.

    Raises:
        AppImportError: a module failed to import.
    """
    before = set(sys.modules)
    load_app(apps)
    libraries = _library_dirs()
    return frozenset(
        name
        for name in set(sys.modules) - before
        if name in sys.modules and _is_app_code(sys.modules[name], libraries)
    )


def reimport_app(apps: Sequence[str], app_modules: Iterable[str]) -> None:
    """Child side, after the fork (reloaded generations only): import the app from disk again.

    Tasks re-register under their names, replacing the inherited ones.

    Raises:
        AppImportError: the code on disk fails to import (the child then exits as unbootable).
    """
    for name in app_modules:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    load_app(apps)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    dirs.add(_EBSQS_DIR)
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


def _is_app_code(module: ModuleType, libraries: tuple[str, ...]) -> bool:
    path = getattr(module, "__file__", None)
    if isinstance(path, str):
        return not os.path.realpath(path).startswith(libraries)
    # A namespace package (no __init__.py) has no file, only locations. Keeping one of the app's
    # while dropping its parent would leave sys.modules with a child whose parent is gone.
    locations = [str(p) for p in getattr(module, "__path__", None) or ()]
    return bool(locations) and not any(os.path.realpath(p).startswith(libraries) for p in locations)

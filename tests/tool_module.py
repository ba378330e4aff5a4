"""Scripts of ``tools/`` (not a package) as modules for the tests."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module, loaded once per test session (registered in ``sys.modules`` first: dataclasses
    resolve their annotations through it). ``tools/`` goes on ``sys.path`` too: a tool's spawned workers import
    it by that name."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.append(str(ROOT / "tools"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

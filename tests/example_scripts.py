"""Import the scripts of examples/ as modules, as they run: with their folder on sys.path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_loaded: dict[str, ModuleType] = {}


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as a module, imported once; the scripts import their shared _common.py."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    if name not in _loaded:
        spec = importlib.util.spec_from_file_location(f"salmask_example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]

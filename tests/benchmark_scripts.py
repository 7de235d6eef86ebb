"""Import a script of ``benchmarks/`` by name in a test (the folder is not a package).

Not a test module; test files import it by name, since pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` executed as module ``name``: registered in ``sys.modules`` (its dataclasses look
    their module up) with ``benchmarks/`` on ``sys.path`` (a script may import its sibling scripts)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

"""The jobs as modules: jobs/ is a folder of scripts, not a package, so tests import them by path."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_job(name: str) -> ModuleType:
    """Imports jobs/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO_ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

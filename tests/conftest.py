"""Shared test helpers."""
import importlib
import os

import pytest


def need(package: str):
    """Import an optional package, or skip the test without it; in CI (CI set) a missing one is a failure."""
    try:
        return importlib.import_module(package)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"needs {package}")

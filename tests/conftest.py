"""Shared test helpers."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pretraining done by tests goes to its own cache, so a test run (1 thread) never leaves tiny backbones
# that differ in the last bits from the ones `python lsrm.py train` (2 threads) makes for the documents' figures.
os.environ["LSRM_CACHE"] = str(ROOT / "runs" / "test-cache")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "LSRM_CACHE": os.environ["LSRM_CACHE"]}


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python lsrm.py ARGS` in a child process (output captured, one thread, the tests' backbone cache)."""
    return subprocess.run([sys.executable, str(ROOT / "lsrm.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=CHILD_ENV)


def need(package: str):
    """Import an optional package, or skip the test without it; in CI (CI set) a missing one is a failure."""
    try:
        return importlib.import_module(package)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"needs {package}")

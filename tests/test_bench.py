"""`lsrm.py bench --quick` end to end: every row is present with sensible fields. No timing assertions:
the numbers depend on the machine and its load, only their shape and sign are checked here."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHILD_ENV

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["train_step", "generate", "kv_cache", "decoder_vs_hf", "vit_vs_hf", "lowest_selection", "peak_memory"]
NEEDS_TRANSFORMERS = {"decoder_vs_hf", "vit_vs_hf"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "lsrm.py"), "bench", "--quick", "--threads", "1", "--out", out],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_machine_description(result):
    m = result[0]["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["torch"] and m["threads"] == 1 and "cpu" in m["devices"]
    assert result[0]["reps"] == 1


def test_every_row_present_with_sensible_fields(result):
    data, stdout = result
    rows = {(r["name"], r["device"]): r for r in data["rows"]}
    has_hf = importlib.util.find_spec("transformers") is not None
    assert {r["config"] for r in data["rows"]} == {"tiny"}
    for name in ROWS:
        r = rows[(name, "cpu")]
        assert name in stdout
        if name in NEEDS_TRANSFORMERS and not has_hf:
            assert "transformers" in r["skipped"]
            continue
        assert "skipped" not in r, r
        for key in ("a_value", "b_value", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["a"] and r["b"] and r["unit"]
        if r["target"] is not None:
            assert r["met"] == (r["ratio"] <= r["target"])
    assert set(n for n, _ in rows) == set(ROWS)


def test_same_weights_as_transformers(result):
    from conftest import need
    need("transformers")
    rows = {r["name"]: r for r in result[0]["rows"]}
    assert rows["decoder_vs_hf"]["max_abs_diff"] < 1e-3       # identical weights: identical outputs
    assert rows["vit_vs_hf"]["max_abs_diff"] < 1e-3


def test_data_bench_passes_and_reports_memory(tmp_path):
    """`bench --data` at a small size: a COCO-format set written and read three ways (0 and 2 workers, the
    old path), each with images/s and memory at the start, middle and end, and the targets checked."""
    out = tmp_path / "data.json"
    r = subprocess.run([sys.executable, str(ROOT / "lsrm.py"), "bench", "--data", "--images", "64", "--out", out],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["images"] == 64 and data["captions"] == 5 * 64 and data["image_size"] == 224 and data["batch"] == 32
    assert [(x["path"], x["workers"]) for x in data["runs"]] == [("DataLoader", 0), ("DataLoader", 2), ("old", 0)]
    for x in data["runs"]:
        assert x["images"] == 64 and x["images_per_s"] > 0
        assert all(x["memory_mb"][k] > 0 for k in ("start", "middle", "end"))
    assert set(data["checks"]["flat"]) == {"0", "2"} and data["checks"]["speedup"] > 0
    assert "images/s" in r.stdout and "memory flat" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "lsrm.py"), "bench", "--data", "--images", "3"],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "at least one batch" in r.stderr


def test_step_check_synchronises_around_its_clock(monkeypatch):
    """On CUDA the clock is read only after the queued work is done: _sync(device) before and after the step
    (a CPU run of the logic, _sync recorded)."""
    import torch
    import tools.bench as bench
    from model import get_config
    calls = []
    monkeypatch.setattr(bench, "_sync", lambda device: calls.append(str(device)))
    out = bench.step_check(get_config("tiny"), torch.device("cpu"), torch.float32, 1, 16)
    assert calls == ["cpu"] * 3 and out["step_seconds"] >= 0 and math.isfinite(out["loss"])

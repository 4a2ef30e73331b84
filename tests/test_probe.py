"""The ViT probe (tiny_data/probe.py): its documented result on a random ViT; on features that carry colour
and shape per slot but no position, it reads identity, and position only with the position tables;
through the command line it writes its table, figure and JSON."""
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHILD_ENV

import model.config as C
from tiny_data import make_tiny_data
from tiny_data.probe import CHANCE, COLUMNS, POSITION, TASKS, load_vit, probe_vit, train_probe
from model.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
W = make_tiny_data


def test_probe_vit_on_a_random_vit_returns_the_documented_result():
    cfg = C.get_config("tiny")
    cfg = dataclasses.replace(cfg, vit=dataclasses.replace(cfg.vit, layers=2, adapters=False),
                              lsrm=dataclasses.replace(cfg.lsrm, taps=[1]))
    torch.manual_seed(0)
    state = {f"visual.{k}": v for k, v in VisionTransformer(cfg.vit).state_dict().items()}
    result = probe_vit(cfg, state, W, n_train=48, n_test=24, steps=3, log=lambda *a: None)
    assert [(r["block"], r["tapped"]) for r in result["rows"]] == [(0, False), (1, True)]
    assert result["columns"] == list(COLUMNS) == ["identity", "identity+P", "left/right", "left/right+P",
                                                  "above/below", "above/below+P"]
    assert all(0 <= r[c] <= 100 for r in result["rows"] for c in COLUMNS)
    assert result["chance"] == CHANCE and (result["n_train"], result["n_test"], result["steps"]) == (48, 24, 3)
    json.dumps(result)                                                # the command writes it as JSON


def test_a_vit_state_that_does_not_fit_is_an_error():
    cfg = C.get_config("tiny")
    state = VisionTransformer(dataclasses.replace(cfg.vit, adapters=False)).state_dict()
    load_vit(cfg, state)                                              # no adapters in the state: none built
    del state["ln_post.weight"]
    with pytest.raises(RuntimeError, match="ln_post.weight"):
        load_vit(cfg, state)


def oracle_features(n: int, seed: int):
    """Stand-in patch features (n', 64, 7) with questions in make_questions' format: each slot of an 8x8
    grid one-hot encodes the colour and shape of the object covering its centre (zeros on the background),
    so the features say *what*, and only the slot index says *where*."""
    rng = random.Random(seed)
    colours, shapes = list(W.COLOURS), list(W.SHAPES)
    feats, q = [], {t: [] for t in TASKS}
    while len(feats) < n:
        _, objs = W.draw_scene(rng)
        unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
        ordered = {t: [(a, b) for a in objs for b in objs if b[ax] - a[ax] >= W.GAP] for t, ax in POSITION.items()}
        if not unique or not all(ordered.values()):
            continue
        f = torch.zeros(64, 7)
        for o in objs:
            for r in range(8):
                for c in range(8):
                    if abs(c * 8 + 4 - o["x"]) <= o["size"] // 2 and abs(r * 8 + 4 - o["y"]) <= o["size"] // 2:
                        f[r * 8 + c, colours.index(o["colour"])] = 1
                        f[r * 8 + c, 4 + shapes.index(o["shape"])] = 1
        feats.append(f)
        o = rng.choice(unique)
        q["identity"].append([shapes.index(o["shape"]), colours.index(o["colour"])])
        for t, pairs in ordered.items():
            a, b = rng.choice(pairs)
            yes = rng.random() < 0.5
            a, b = (a, b) if yes else (b, a)
            q[t].append([colours.index(a["colour"]), shapes.index(a["shape"]), colours.index(b["colour"]),
                         shapes.index(b["shape"]), int(yes)])
    return torch.stack(feats), {t: torch.tensor(v) for t, v in q.items()}


def test_probe_reads_identity_and_needs_the_tables_for_position():
    f_train, q_train = oracle_features(600, 1)
    f_test, q_test = oracle_features(300, 2)
    plain = train_probe(f_train, q_train, f_test, q_test, tables=False, steps=300, seed=0)
    tables = train_probe(f_train, q_train, f_test, q_test, tables=True, steps=300, seed=0)
    assert plain["identity"] > 90 and tables["identity"] > 90          # colour of the named shape
    for t in POSITION:
        assert tables[t] > 85, (t, tables)                             # where, from the slot it sits in
        assert abs(plain[t] - CHANCE[t]) < 12, (t, plain)               # no position in the features: chance


def test_probe_command_writes_table_figure_and_json(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "lsrm.py"), "probe", "--set", "train.pretrained=false",
                        "--train", "64", "--test", "32", "--steps", "5", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(c in r.stdout for c in COLUMNS) and "3*" in r.stdout and "4*" in r.stdout
    result = json.loads((tmp_path / "probe.json").read_text())
    assert [row["block"] for row in result["rows"]] == list(range(6))
    assert all(0 <= row[c] <= 100 for row in result["rows"] for c in COLUMNS)
    from PIL import Image
    assert Image.open(tmp_path / "probe.png").size == (960, 480)

"""The ViT probe (model/probe.py): on features that carry position and colour by construction it reads
both; through the command line it writes its table, figure and JSON."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from conftest import CHILD_ENV

from model.pretrain import _world
from model.probe import CHANCE, train_probe

ROOT = Path(__file__).resolve().parents[1]
W = _world()


def oracle_features(n: int, seed: int):
    """Stand-in patch features (n', 64, 12), questions in make_questions' format: each slot of an 8x8 grid
    one-hot encodes the colour and shape of the object covering its centre (zeros on the background), so
    the features say *what*, and only the slot index says *where*."""
    rng = __import__("random").Random(seed)
    colours, shapes = list(W.COLOURS), list(W.SHAPES)
    feats, ident, pos = [], [], []
    for _ in range(n):
        _, objs = W.draw_scene(rng)
        unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
        left = [(a, b) for a in objs for b in objs if b["x"] - a["x"] >= W.GAP]
        if not unique or not left:
            continue
        f = torch.zeros(64, 12)
        for o in objs:
            for r in range(8):
                for c in range(8):
                    if abs(c * 8 + 4 - o["x"]) <= o["size"] // 2 and abs(r * 8 + 4 - o["y"]) <= o["size"] // 2:
                        f[r * 8 + c, colours.index(o["colour"])] = 1
                        f[r * 8 + c, 4 + shapes.index(o["shape"])] = 1
        o = rng.choice(unique)
        a, b = rng.choice(left)
        if rng.random() < 0.5:
            a, b = b, a
        feats.append(f)
        ident.append([shapes.index(o["shape"]), colours.index(o["colour"])])
        pos.append([colours.index(a["colour"]), shapes.index(a["shape"]), colours.index(b["colour"]),
                    shapes.index(b["shape"]), int(a["x"] < b["x"])])
    return torch.stack(feats), {"identity": torch.tensor(ident), "position": torch.tensor(pos)}


def test_probe_reads_identity_and_needs_the_tables_for_position():
    f_train, q_train = oracle_features(600, 1)
    f_test, q_test = oracle_features(300, 2)
    plain = train_probe(f_train, q_train, f_test, q_test, tables=False, steps=300, seed=0)
    tables = train_probe(f_train, q_train, f_test, q_test, tables=True, steps=300, seed=0)
    assert plain["identity"] > 90 and tables["identity"] > 90          # colour of the named shape
    assert tables["position"] > 85                                     # where, from the slot it sits in
    assert abs(plain["position"] - CHANCE["position"]) < 12            # no position in the features: chance


def test_probe_command_writes_table_figure_and_json(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "lsrm.py"), "probe", "--set", "train.pretrained=false",
                        "--train", "64", "--test", "32", "--steps", "5", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identity+P" in r.stdout and "position+P" in r.stdout and "3*" in r.stdout
    result = json.loads((tmp_path / "probe.json").read_text())
    assert [row["block"] for row in result["rows"]] == list(range(6))
    assert all(0 <= row[k] <= 100 for row in result["rows"] for k in ("identity", "identity+P", "position", "position+P"))
    from PIL import Image
    assert Image.open(tmp_path / "probe.png").size == (720, 420)

"""The paper's premise, measured on the tiny frozen ViT (paper §3.1, multilevel fusion).

LSRM reads intermediate ViT layers because, the paper argues, the last layers of a classification-like
encoder (CLIP) keep *what* is in a picture but lose *where* things are relative to each other. This
probe measures both per block, on the exact features the visual memory reads, ln_post(h[:, 1:]):

  identity     name one object by its shape (unique in the picture): what colour is it?     chance 25%
  left/right   name two objects A, B by colour and shape: is A to the left of B?          chance 50%
  above/below  the same for "is A above B?"                                               chance 50%

Position questions only ask about pairs whose centres differ by at least GAP px along the axis asked,
with the answer balanced (yes half of the time).

The probe is a memory read in miniature: a query made from the asked object's colour and shape
embeddings attends over the patch tokens (softmax(q Kᵀ/√d) V, K = W_k f, V = W_v f) and a small head
answers from what it read (identity: a linear layer on r; position: an MLP on [r_A, r_B]). One probe per
block and variant learns all three heads together on shared W_k, W_v. It runs with and without learned
per-slot position tables added to K and V, as P1/P2 are added in the visual memory: with them, the probe
can read *where* an object is from the slot it sits in, even when the features themselves no longer say.
Without them, softmax attention is permutation-invariant over the tokens, so the probe reads position
only if the features still carry it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import Config
from model.data import preprocess_image
from model.train import fmt_time
from model.vit import VisionTransformer

POSITION = {"left/right": "x", "above/below": "y"}      # position task -> the axis it asks about
TASKS = ("identity", *POSITION)
CHANCE = {"identity": 25.0, "left/right": 50.0, "above/below": 50.0}
COLUMNS = tuple(c for t in TASKS for c in (t, t + "+P"))
QUESTION = {"identity": "colour of a named shape", "left/right": "is A left of B", "above/below": "is A above B"}


def make_questions(n: int, seed: int, image_size: int, preprocess: str, world) -> dict[str, torch.Tensor]:
    """n fresh toy pictures (world.draw_scene, seeded), each with one question per task:

    images (n, 3, S, S); identity (n, 2) = [shape asked, colour answer];
    left/right, above/below (n, 5) = [colour A, shape A, colour B, shape B, answer (1 = A left of / above B)].
    Pictures without a unique shape or without a clear pair on both axes are skipped."""
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    rng = random.Random(seed)
    out = {"images": [], **{t: [] for t in TASKS}}
    while len(out["images"]) < n:
        img, objs = world.draw_scene(rng)
        unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
        ordered = {t: [(a, b) for a in objs for b in objs if b[ax] - a[ax] >= world.GAP] for t, ax in POSITION.items()}
        if not unique or not all(ordered.values()):
            continue
        o = rng.choice(unique)
        out["images"].append(preprocess_image(img, image_size, preprocess))
        out["identity"].append([shapes.index(o["shape"]), colours.index(o["colour"])])
        for t, pairs in ordered.items():
            a, b = rng.choice(pairs)                       # a before b along the axis
            yes = rng.random() < 0.5
            if not yes:
                a, b = b, a
            out[t].append([colours.index(a["colour"]), shapes.index(a["shape"]), colours.index(b["colour"]),
                           shapes.index(b["shape"]), int(yes)])
    return {"images": torch.stack(out["images"]), **{t: torch.tensor(out[t]) for t in TASKS}}


@torch.no_grad()
def block_features(vit: VisionTransformer, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(L, n, P, Dv): ln_post of every block's patch tokens (CLS dropped), as the visual memory reads them."""
    blocks = list(range(vit.cfg.layers))
    out = []
    for i in range(0, len(images), batch):
        out.append(torch.stack([f.float() for f in vit.patch_features(images[i:i + batch], blocks)]))  # L x (b, P, Dv)
    return torch.cat(out, 1)


class Probe(nn.Module):
    def __init__(self, d_in: int, n_slots: int, tables: bool, d: int = 64, n_colours: int = 4, n_shapes: int = 3):
        super().__init__()
        self.colour, self.shape = nn.Embedding(n_colours, d), nn.Embedding(n_shapes, d)
        self.k, self.v = nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.p1 = nn.Parameter(torch.randn(1, n_slots, d) * 0.02) if tables else None
        self.p2 = nn.Parameter(torch.randn(1, n_slots, d) * 0.02) if tables else None
        self.identity = nn.Linear(d, n_colours)
        self.position = nn.ModuleDict({t.replace("/", "_"): nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
                                       for t in POSITION})

    def read(self, f: torch.Tensor, q: torch.Tensor) -> torch.Tensor:    # f (B, P, Dv), q (B, R, d) -> (B, R, d)
        """R reads of the same picture: the keys and values are projected once for all its questions."""
        k, v = self.k(f), self.v(f)                                      # (B, P, d)
        if self.p1 is not None:
            k, v = k + self.p1, v + self.p2                              # K = W_k f + P1, V = W_v f + P2
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)   # (B, R, P)
        return a @ v

    def forward(self, f: torch.Tensor, q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits per task: identity (B, n_colours), each position task (B,)."""
        queries = [self.shape(q["identity"][:, 0])]                       # the named shape
        for t in POSITION:                                                # A and B, by colour and shape
            queries += [self.colour(q[t][:, 0]) + self.shape(q[t][:, 1]), self.colour(q[t][:, 2]) + self.shape(q[t][:, 3])]
        r = self.read(f, torch.stack(queries, 1))                         # (B, 1 + 2 * len(POSITION), d)
        out = {"identity": self.identity(r[:, 0])}
        for i, t in enumerate(POSITION):
            out[t] = self.position[t.replace("/", "_")](r[:, 1 + 2 * i:3 + 2 * i].flatten(1))[:, 0]
        return out


def probe_loss(logits: dict[str, torch.Tensor], q: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits["identity"], q["identity"][:, 1]) + sum(
        F.binary_cross_entropy_with_logits(logits[t], q[t][:, 4].float()) for t in POSITION)


def train_probe(f_train, q_train, f_test, q_test, tables: bool, steps: int, seed: int,
                batch: int = 64, lr: float = 3e-3) -> dict[str, float]:
    """Train one probe (all heads) on one block's features f (n, P, Dv) with questions q (make_questions'
    format); held-out accuracy (%) per task."""
    torch.manual_seed(seed)
    probe = Probe(f_train.shape[-1], f_train.shape[1], tables)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(f_train), (batch,), generator=g)
        loss = probe_loss(probe(f_train[idx], {t: q_train[t][idx] for t in TASKS}), {t: q_train[t][idx] for t in TASKS})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = probe(f_test, q_test)
    acc = {"identity": (logits["identity"].argmax(-1) == q_test["identity"][:, 1]).float().mean().item()}
    acc.update({t: ((logits[t] > 0).long() == q_test[t][:, 4]).float().mean().item() for t in POSITION})
    return {t: 100.0 * a for t, a in acc.items()}


def load_vit(cfg: Config, vit_state: dict[str, torch.Tensor]) -> VisionTransformer:
    """The frozen ViT from 'visual.*' (or bare) tensors; adapters only if the state has them. Strict: a
    state of another shape is an error, never a silently random ViT."""
    state = {k.removeprefix("visual."): v for k, v in vit_state.items()}
    adapters = any(".adapter." in k for k in state)
    vit = VisionTransformer(dataclasses.replace(cfg.vit, adapters=adapters)).eval()
    vit.load_state_dict(state)
    return vit.requires_grad_(False)


def probe_vit(cfg: Config, vit_state: dict[str, torch.Tensor], world, n_train: int = 2000, n_test: int = 500,
              steps: int = 1500, seed: int = 0, log: Callable = print) -> dict:
    """Per block of the ViT (cfg.vit, weights vit_state), held-out accuracy (%) of the probe for each task,
    without and with position tables. Returns {"rows": [{"block", "tapped", <COLUMNS>...}, ...],
    "columns", "chance", "questions", "n_train", "n_test", "steps", "seed"}. Deterministic for a given
    torch build and thread count."""
    vit = load_vit(cfg, vit_state)
    q_train = make_questions(n_train, seed, cfg.vit.image_size, cfg.train.preprocess, world)
    q_test = make_questions(n_test, seed + 1, cfg.vit.image_size, cfg.train.preprocess, world)
    f_train, f_test = block_features(vit, q_train.pop("images")), block_features(vit, q_test.pop("images"))
    rows = []
    for block in range(cfg.vit.layers):
        row = {"block": block, "tapped": block in cfg.lsrm.taps}
        for tables in (False, True):
            acc = train_probe(f_train[block], q_train, f_test[block], q_test, tables, steps, seed + block)
            row.update({t + ("+P" if tables else ""): acc[t] for t in TASKS})
        rows.append({"block": block, "tapped": row["tapped"], **{c: row[c] for c in COLUMNS}})
        log(f"probe block {block}: " + "  ".join(f"{c} {row[c]:.1f}" for c in COLUMNS))
    return {"rows": rows, "columns": list(COLUMNS), "chance": CHANCE, "questions": QUESTION,
            "n_train": n_train, "n_test": n_test, "steps": steps, "seed": seed}


def format_probe(result: dict) -> str:
    w = max(len(c) for c in COLUMNS) + 2
    lines = ["held-out accuracy (%) of a probe on each ViT block's patch features (+P: with position tables)",
             f"{'block':>5}  " + "".join(f"{c:>{w}}" for c in COLUMNS)]
    for r in result["rows"]:
        lines.append(f"{r['block']:>5}{'*' if r['tapped'] else ' '} " + "".join(f"{r[c]:>{w}.1f}" for c in COLUMNS))
    lines.append("chance: " + ", ".join(f"{t} ({QUESTION[t]}) {CHANCE[t]:.0f}" for t in TASKS)
                 + "; * = a block LSRM taps")
    return "\n".join(lines)


HUES = {"identity": ((30, 70, 200), (120, 160, 250)), "left/right": ((200, 30, 30), (250, 140, 120)),
        "above/below": ((20, 130, 50), (120, 200, 120))}               # task -> (+P, without tables)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)                      # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def probe_figure(result: dict):
    """Accuracy per block (PIL image): per task, a thick line with position tables and a thin one without,
    the task's chance level dashed in its colour, the tapped blocks shaded."""
    from PIL import Image, ImageDraw
    W, H, left, right, top, bottom = 960, 480, 60, 300, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(14)
    rows = result["rows"]
    n = len(rows)
    step = (W - left - right) / n                                     # one column per block

    def xy(i, acc):
        return left + step * (i + 0.5), top + (H - top - bottom) * (1 - acc / 100)

    d.text((left, 12), "Tiny ViT probe: what each block's patch features keep (held-out accuracy, %)",
           fill="black", font=font)
    for r in rows:
        if r["tapped"]:
            d.rectangle([left + step * r["block"], top, left + step * (r["block"] + 1), H - bottom], fill=(238, 238, 238))
    for acc in range(0, 101, 25):
        y = xy(0, acc)[1]
        d.line([(left, y), (W - right, y)], fill=(210, 210, 210))
        d.text((left - 8, y), f"{acc}", fill="black", font=small, anchor="rm")
    d.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black")
    for r in rows:
        d.text((xy(r["block"], 0)[0], H - bottom + 6), f"{r['block']}", fill="black", font=font, anchor="ma")
    d.text(((left + W - right) / 2, H - 22), "ViT block (shaded: tapped by LSRM)", fill="black", font=small, anchor="ma")
    for task in TASKS:                                                # chance levels, dashed
        y = xy(0, result["chance"][task])[1] + (2 if task == "above/below" else 0)   # the two 50% lines side by side
        for x in range(left, W - right, 10):
            d.line([(x, y), (x + 5, y)], fill=HUES[task][0], width=1)
    ly, lx = top, W - right + 20
    for task in TASKS:
        d.text((lx, ly), f"{task} (chance {result['chance'][task]:.0f}%)", fill="black", font=font)
        d.text((lx, ly + 20), QUESTION[task], fill=(90, 90, 90), font=small)
        ly += 42
        for col, (hue, width) in ((task + "+P", (HUES[task][0], 4)), (task, (HUES[task][1], 2))):
            pts = [xy(i, r[col]) for i, r in enumerate(rows)]
            d.line(pts, fill=hue, width=width)
            for x, y in pts:
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=hue)
            d.line([(lx, ly + 8), (lx + 30, ly + 8)], fill=hue, width=width)
            d.text((lx + 38, ly), "with position tables (+P)" if col.endswith("+P") else "without", fill="black",
                   font=small)
            ly += 20
        ly += 14
    d.text((lx, ly), "dashed: chance levels", fill=(90, 90, 90), font=small)
    return img


def run_probe(cfg: Config, out: Path, n_train: int = 2000, n_test: int = 500, steps: int = 1500,
              seed: int = 0) -> str:
    """`python lsrm.py probe`: the tiny ViT's pretrained weights (random ones if `train.pretrained` is false: a
    smoke test) probed per block on the toy world's pictures; writes out/probe.png and out/probe.json and
    returns the table and what was written."""
    from model.vlm import build
    from . import make_tiny_data
    from .pretrain import pretrained_vit
    if cfg.train.pretrained:
        state = pretrained_vit(cfg)
    else:
        torch.manual_seed(cfg.train.seed)
        state = build(cfg).visual.state_dict()
    t0 = time.time()
    result = probe_vit(cfg, state, make_tiny_data, n_train, n_test, steps, seed, log=lambda *a: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    probe_figure(result).save(out / "probe.png")
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    return format_probe(result) + f"\n{fmt_time(time.time() - t0)}; wrote {out / 'probe.png'} and {out / 'probe.json'}"

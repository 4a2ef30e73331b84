"""The paper's premise, measured on the tiny frozen ViT (paper §3.1, multilevel fusion).

LSRM reads intermediate ViT layers because, the paper argues, the last layers of a classification-like
encoder (CLIP) keep *what* is in a picture but lose *where* things are relative to each other. This
probe measures both per block, on the exact features the visual memory reads, ln_post(h[:, 1:]):

  identity   name one object by its shape (unique in the picture): what colour is it?     chance 25%
  position   name two objects A, B by colour and shape: is A to the left of B?          chance 50%

The probe is a memory read in miniature: a query made from the asked object's colour and shape
embeddings attends over the patch tokens (softmax(q Kᵀ/√d) V, K = W_k f, V = W_v f) and a small head
answers from what it read. It runs with and without learned per-slot position tables added to K and V,
as P1/P2 are added in the visual memory: with them, the probe can read *where* an object is from the slot
it sits in, even when the features themselves no longer say.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .data import preprocess_image
from .vit import VisionTransformer

TASKS = ("identity", "position")
CHANCE = {"identity": 25.0, "position": 50.0}


def make_questions(n: int, seed: int, image_size: int, preprocess: str, world) -> dict[str, torch.Tensor]:
    """n fresh toy pictures, each with one identity and one position question (balanced left/right)."""
    colours, shapes = list(world.COLOURS), list(world.SHAPES)
    rng = random.Random(seed)
    images, ident, pos = [], [], []
    while len(images) < n:
        img, objs = world.draw_scene(rng)
        unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
        pairs = [(a, b) for a in objs for b in objs if a is not b and abs(a["x"] - b["x"]) >= world.GAP]
        if not unique or not pairs:
            continue
        o = rng.choice(unique)
        left = [(a, b) for a, b in pairs if a["x"] < b["x"]]
        a, b = rng.choice(left if rng.random() < 0.5 else [(b, a) for a, b in left])
        images.append(preprocess_image(img, image_size, preprocess))
        ident.append([shapes.index(o["shape"]), colours.index(o["colour"])])
        pos.append([colours.index(a["colour"]), shapes.index(a["shape"]), colours.index(b["colour"]),
                    shapes.index(b["shape"]), int(a["x"] < b["x"])])
    return {"images": torch.stack(images), "identity": torch.tensor(ident), "position": torch.tensor(pos)}


@torch.no_grad()
def block_features(vit: VisionTransformer, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(L, n, P, Dv): ln_post of every block's patch tokens (CLS dropped), as the visual memory reads them."""
    blocks = list(range(vit.cfg.layers))
    out = []
    for i in range(0, len(images), batch):
        hidden = vit(images[i:i + batch], blocks)                       # L x (b, 1 + P, Dv)
        out.append(torch.stack([vit.ln_post(h[:, 1:]).float() for h in hidden]))
    return torch.cat(out, 1)


class Probe(nn.Module):
    def __init__(self, d_in: int, n_slots: int, tables: bool, d: int = 64):
        super().__init__()
        self.colour, self.shape = nn.Embedding(4, d), nn.Embedding(3, d)
        self.k, self.v = nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.p1 = nn.Parameter(torch.randn(1, n_slots, d) * 0.02) if tables else None
        self.p2 = nn.Parameter(torch.randn(1, n_slots, d) * 0.02) if tables else None
        self.identity = nn.Linear(d, 4)
        self.position = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))

    def read(self, f: torch.Tensor, q: torch.Tensor) -> torch.Tensor:    # f (B, P, Dv), q (B, d) -> (B, d)
        k, v = self.k(f), self.v(f)
        if self.p1 is not None:
            k, v = k + self.p1, v + self.p2                              # K = W_k f + P1, V = W_v f + P2
        a = torch.softmax(k @ q[:, :, None] / math.sqrt(q.shape[-1]), dim=1)     # (B, P, 1)
        return (a * v).sum(1)

    def forward(self, f: torch.Tensor, ident: torch.Tensor, pos: torch.Tensor):
        colour_logits = self.identity(self.read(f, self.shape(ident[:, 0])))
        ra = self.read(f, self.colour(pos[:, 0]) + self.shape(pos[:, 1]))
        rb = self.read(f, self.colour(pos[:, 2]) + self.shape(pos[:, 3]))
        return colour_logits, self.position(torch.cat([ra, rb], -1))[:, 0]


def train_probe(f_train, q_train, f_test, q_test, tables: bool, steps: int, seed: int) -> dict[str, float]:
    """Train one probe (both heads) on one block's features; held-out accuracy (%) per task."""
    torch.manual_seed(seed)
    probe = Probe(f_train.shape[-1], f_train.shape[1], tables)
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(f_train), (64,), generator=g)
        colour_logits, left_logit = probe(f_train[idx], q_train["identity"][idx], q_train["position"][idx])
        loss = F.cross_entropy(colour_logits, q_train["identity"][idx, 1]) + \
            F.binary_cross_entropy_with_logits(left_logit, q_train["position"][idx, 4].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        colour_logits, left_logit = probe(f_test, q_test["identity"], q_test["position"])
    return {"identity": 100.0 * (colour_logits.argmax(-1) == q_test["identity"][:, 1]).float().mean().item(),
            "position": 100.0 * ((left_logit > 0).long() == q_test["position"][:, 4]).float().mean().item()}


def probe_vit(cfg: Config, vit_state: dict[str, torch.Tensor], world, n_train: int = 2000, n_test: int = 500,
              steps: int = 600, seed: int = 0, log: Callable = print) -> dict:
    """Per block: held-out accuracy of the probe for identity and position, without and with position
    tables. vit_state: the ViT's weights ('visual.*' keys or bare ones)."""
    vit = VisionTransformer(cfg.vit).eval()
    vit.load_state_dict({k.removeprefix("visual."): v for k, v in vit_state.items()}, strict=False)
    q_train = make_questions(n_train, seed, cfg.vit.image_size, cfg.train.preprocess, world)
    q_test = make_questions(n_test, seed + 1, cfg.vit.image_size, cfg.train.preprocess, world)
    f_train, f_test = block_features(vit, q_train["images"]), block_features(vit, q_test["images"])
    rows = []
    for block in range(cfg.vit.layers):
        row = {"block": block, "tapped": block in cfg.lsrm.taps}
        for tables in (False, True):
            acc = train_probe(f_train[block], q_train, f_test[block], q_test, tables, steps, seed + block)
            for task in TASKS:
                row[task + ("+P" if tables else "")] = acc[task]
        rows.append(row)
        log(f"probe block {block}: " + "  ".join(f"{k} {v:.1f}" for k, v in row.items() if k not in ("block", "tapped")))
    return {"rows": rows, "chance": CHANCE, "n_train": n_train, "n_test": n_test, "steps": steps}


COLUMNS = ("identity", "identity+P", "position", "position+P")


def format_probe(result: dict) -> str:
    lines = ["held-out accuracy (%) of a probe on each ViT block's patch features (+P: with position tables)",
             f"{'block':>5}  " + "".join(f"{c:>12}" for c in COLUMNS)]
    for r in result["rows"]:
        lines.append(f"{r['block']:>5}{'*' if r['tapped'] else ' '} " + "".join(f"{r[c]:>12.1f}" for c in COLUMNS))
    lines.append(f"chance: identity {CHANCE['identity']:.0f}, position (is A left of B) {CHANCE['position']:.0f}; "
                 "* = a block LSRM taps")
    return "\n".join(lines)


def probe_figure(result: dict):
    """Accuracy per block, one line per probe (PIL image)."""
    from PIL import Image, ImageDraw
    W, H, left, right, top, bottom = 720, 420, 60, 200, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    rows = result["rows"]
    n = len(rows)

    def xy(i, acc):
        x = left + (W - left - right) * (i / max(n - 1, 1))
        return x, top + (H - top - bottom) * (1 - acc / 100)

    d.text((left, 10), "Tiny ViT probe: what each block keeps (held-out accuracy, %)", fill="black")
    for acc in range(0, 101, 25):
        y = xy(0, acc)[1]
        d.line([(left, y), (W - right, y)], fill=(225, 225, 225))
        d.text((left - 28, y - 6), f"{acc}", fill="black")
    for r in rows:
        x = xy(r["block"], 0)[0]
        d.text((x - 14, H - bottom + 8), f"{r['block']}{'*' if r['tapped'] else ''}", fill="black")
    d.text((left, H - 20), "ViT block (* tapped by LSRM)", fill="black")
    styles = {"identity": (40, 80, 220), "identity+P": (120, 160, 255), "position": (220, 40, 40),
              "position+P": (255, 140, 120)}
    for k, (name, colour) in enumerate(styles.items()):
        pts = [xy(i, r[name]) for i, r in enumerate(rows)]
        d.line(pts, fill=colour, width=3 if name.endswith("+P") else 2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 20 * k
        d.line([(W - right + 15, ly + 6), (W - right + 40, ly + 6)], fill=colour, width=3)
        d.text((W - right + 45, ly), name, fill="black")
    for task, colour in (("identity", (40, 80, 220)), ("position", (220, 40, 40))):
        y = xy(0, CHANCE[task])[1]
        for x in range(left, W - right, 8):
            d.line([(x, y), (x + 3, y)], fill=colour)
        d.text((W - right + 15, top + 100 + (20 if task == "position" else 0)), f"chance, {task}: {CHANCE[task]:.0f}%",
               fill="black")
    return img

"""The data path's benchmark (`python lsrm.py bench --data`): can the DataLoader feed a COCO-sized run, and
does its memory stay flat?

A synthetic COCO-format set is written to a temporary directory: Karpathy's `dataset_coco.json` and `--images`
JPEGs of COCO's size (640 x 480 or 480 x 640, smooth colour fields with grain, ~130 KB where COCO's average
~160 KB), 5 captions each. One pass over its pictures (each once, in a training permutation) at the paper's
image size (224, CLIP's preprocessing) and batch (32 a step, micro-batches of 4) is timed through the trainer's
DataLoader with 0 worker processes and with `--workers` (pictures handed over as uint8: the model normalises
them on its device, which is not timed here), taking the memory of the process and its workers
(PSS, so pages they share count once) at the first batch, half way and at the last. The old path (every
picture kept as float32 for the whole run, batches built in the training loop) runs on the same set for its
memory growth.

Targets: memory at the end within 10% (or 200 MB) of the middle; images/s with 2 workers >= 1.7x with 0 (a
2-core machine). Nothing here is asserted: the numbers are measured and reported.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.config import get_config
from model.data import DataError, VLDataset, load_image, read_coco
from model.assemble import make_tokenizer
from model.train import batch_indices, make_loader

TARGET_FLAT, TARGET_FLAT_MB, TARGET_SPEEDUP = 0.10, 200, 1.7
WORDS = ("a man woman dog cat bus train plate of food sitting on top table next to street with two people "
         "standing in front large small white red blue green group young field water near an open kitchen").split()


def write_coco(root: Path, n_images: int, seed: int = 0, log=print) -> Path:
    """n_images JPEGs under root/train2014 and a dataset_coco.json listing them (split "train", 5 captions each)."""
    rng = np.random.default_rng(seed)
    grain = [rng.integers(-20, 21, (640, 640, 3), dtype=np.int16) for _ in range(16)]   # reused: cheap to draw
    (root / "train2014").mkdir(parents=True, exist_ok=True)
    images, t0 = [], time.time()
    for i in range(n_images):
        w, h = (640, 480) if i % 3 else (480, 640)
        field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.clip(np.asarray(field, dtype=np.int16) + grain[i % 16][:h, :w], 0, 255).astype(np.uint8)
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray(pixels).save(root / "train2014" / name, quality=92)
        captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 14)))) for _ in range(5)]
        images.append({"filepath": "train2014", "filename": name, "imgid": i, "cocoid": i, "split": "train",
                       "sentences": [{"raw": c + ".", "tokens": c.split()} for c in captions]})
        if log and (i + 1) % 5000 == 0:
            log(f"  wrote {i + 1}/{n_images} JPEGs ({time.time() - t0:.0f}s)")
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


# ---------------------------------------------------------------------------------------------
# Memory of a process and its workers

def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:                              # a process gone meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _pss(pid: int) -> int:
    """Proportional set size in bytes (Linux >= 4.14): shared pages divided among the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_memory_mb() -> float:
    """PSS of this process and its children (the DataLoader's workers), in MB."""
    me = os.getpid()
    return sum(_pss(p) for p in [me, *_children(me)]) / 2 ** 20


# ---------------------------------------------------------------------------------------------
# The passes

class OldDataset(VLDataset):
    """The path before: every picture preprocessed once and kept as float32 (602 KB at 224 px) for the run."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.kept: dict[Path, torch.Tensor] = {}

    def image(self, path):
        if path is None:
            return torch.zeros(3, self.image_size, self.image_size)
        if path not in self.kept:
            self.kept[path] = load_image(path, self.image_size, self.preprocess)
        return self.kept[path]


def timed_pass(batches, n_steps: int, per_step: int) -> dict:
    """Consume n_steps x per_step micro-batches; images/s and memory at the first, middle and last step."""
    t0, images, mem = time.perf_counter(), 0, {}
    for step in range(n_steps):
        for _ in range(per_step):
            b = next(batches)
            if isinstance(b, DataError):
                raise b
            images += int(b["has_image"].sum())
        if step == 0:
            mem["start"] = tree_memory_mb()
        if step == n_steps // 2:
            mem["middle"] = tree_memory_mb()
    mem["end"] = tree_memory_mb()
    seconds = time.perf_counter() - t0
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "memory_mb": mem,
            "end_vs_middle_mb": mem["end"] - mem["middle"]}


def run_data_bench(n_images: int = 20_000, workers: int = 2, old: bool = True, log=print) -> dict:
    cfg = get_config("llama-13b-coco")                  # the paper's COCO run: 224 px, batch 32 in micro-batches of 4
    tokenizer = make_tokenizer(get_config("tiny"))      # any tokenizer: the pictures dominate
    device = torch.device("cpu")
    runs = []
    with tempfile.TemporaryDirectory(prefix="lsrm-data-bench-") as tmp:
        log(f"writing {n_images} COCO-sized JPEGs to {tmp} ...")
        t0 = time.time()
        root = write_coco(Path(tmp), n_images, log=log)
        written = time.time() - t0
        os.sync()               # the kernel would write the new files out during the first timed pass otherwise
        size_mb = sum(f.stat().st_size for f in (root / "train2014").iterdir()) / 2 ** 20
        captions = read_coco(root, "train")             # 5 items per picture, held as training holds them
        pictures = [e for e in captions if e.id.endswith("-0")]          # the pass: each picture once
        n_steps = len(pictures) // cfg.train.batch_size
        per_step = cfg.train.batch_size // cfg.train.micro_batch
        for w in sorted({0, workers}):
            log(f"one pass, {w} worker(s) ...")
            ds = VLDataset(pictures, tokenizer, cfg.vit.image_size, cfg.train.preprocess, cfg.train.max_len,
                           cache_mb=cfg.train.image_cache_mb)
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workers=w))
            r = timed_pass(iter(make_loader(ds, c, 0, 1, 0, n_steps, device)), n_steps, per_step)
            runs.append({"path": "DataLoader", "workers": w, **r})
        if old:
            log("one pass, the old path (float32 cache, batches built in the loop) ...")
            ds = OldDataset(pictures, tokenizer, cfg.vit.image_size, cfg.train.preprocess, cfg.train.max_len)
            steps = ([ds.collate([ds[j] for j in chunk]) for chunk in batch_indices(len(ds), cfg, 0, i, 0, 1)]
                     for i in range(n_steps))
            r = timed_pass((b for step in steps for b in step), n_steps, per_step)
            runs.append({"path": "old", "workers": 0, **r})
    new = {r["workers"]: r for r in runs if r["path"] == "DataLoader"}
    checks = {"flat": {w: abs(r["end_vs_middle_mb"]) <= max(TARGET_FLAT * r["memory_mb"]["middle"], TARGET_FLAT_MB)
                       for w, r in new.items()}}
    if workers in new and workers > 0:
        checks["speedup"] = new[workers]["images_per_s"] / new[0]["images_per_s"]
        checks["speedup_met"] = checks["speedup"] >= TARGET_SPEEDUP if workers == 2 else None
    return {"images": n_images, "captions": len(captions), "jpeg_mb": size_mb, "write_seconds": written,
            "image_size": cfg.vit.image_size, "batch": cfg.train.batch_size, "micro_batch": cfg.train.micro_batch,
            "cores": os.cpu_count(), "load_average": os.getloadavg(), "runs": runs, "checks": checks}


def report(result: dict) -> str:
    lines = [f"{result['images']} JPEGs ({result['jpeg_mb']:.0f} MB, {result['captions']} captions; written in "
             f"{result['write_seconds']:.0f}s), one pass at "
             f"{result['image_size']} px, batch {result['batch']} in micro-batches of {result['micro_batch']}; "
             f"{result['cores']} cores, load average {result['load_average'][0]:.1f}",
             f"{'path':11} {'workers':>7} {'images/s':>9} {'start MB':>9} {'middle MB':>10} {'end MB':>8} "
             f"{'end-middle':>11}"]
    for r in result["runs"]:
        m = r["memory_mb"]
        lines.append(f"{r['path']:11} {r['workers']:7d} {r['images_per_s']:9.1f} {m['start']:9.0f} {m['middle']:10.0f} "
                     f"{m['end']:8.0f} {r['end_vs_middle_mb']:11.0f}")
    c = result["checks"]
    flat = ", ".join(f"{w} workers {'ok' if ok else 'MISS'}" for w, ok in c["flat"].items())
    lines.append(f"memory flat (end within {TARGET_FLAT:.0%} or {TARGET_FLAT_MB} MB of the middle): {flat}")
    if "speedup" in c:
        met = "" if c["speedup_met"] is None else f" (target >= {TARGET_SPEEDUP} with 2: {'ok' if c['speedup_met'] else 'MISS'})"
        lines.append(f"images/s with workers over 0 workers: x{c['speedup']:.2f}{met}")
    return "\n".join(lines)

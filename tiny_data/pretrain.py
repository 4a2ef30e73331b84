"""Pretraining the tiny backbones, so that they know something before PEFT, as CLIP and LLaMA do.

- ViT: a classification-style objective (which objects — colour x shape — are in the picture, from the
  pooled CLS token), as CLIP's contrastive objective is classification-like. This is the paper's
  motivation: the final layer learns *what* is there and need not keep *where*; relationships must be
  recovered from intermediate layers (multilevel fusion).
- Decoder: a language model (tokens: bytes plus the words of tiny_data/words.txt) on toy text from the
  same world (picture questions with the picture in words, as the oracle bound gives it, text-only and
  hint questions, all in the fine-tuning prompt format), drawn with a different seed than tiny_data, as
  LLaMA has read text like ScienceQA's before and can reason about a scene described to it.

Both are deterministic. `python lsrm.py pretrain` writes them to tiny_data/backbones/{vit,lm}.pt, the
committed files `train` uses (README gives the command, torch version and checksums), and the step-wise
decoder (the direct one taught further by stepwise.py) to lm_stepwise.pt; a config or recipe they do not
fit is pretrained instead, once, into runs/cache/ keyed by a hash of everything it depends on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.checkpoint import atomic_save, write_atomically
from model.config import Config, LlamaConfig, ViTConfig, memvp
from model.data import preprocess_image
from model.errors import CheckpointError, WeightsError
from model.llama import Transformer
from model.paths import ROOT
from model.train import autocast
from model.vit import VisionTransformer
from model.vlm import build
from model.weights import all_finite, load_own

from . import make_tiny_data as world                 # the toy world's generator
from .corpus import ANSWER_MARK, LM_RECIPE, answer_index, pack_documents, weighted_next_token_loss  # noqa: F401

GENERATOR = Path(world.__file__)                     # its sha256 is part of every backbone's key
CACHE = Path(os.environ.get("LSRM_CACHE") or ROOT / "runs" / "cache")    # the tests use their own
BACKBONES = ROOT / "tiny_data" / "backbones"          # committed: written by `python lsrm.py pretrain`
BACKBONE_FORMAT = "lsrm-tiny-backbone-v1"

VIT_RECIPE = dict(seed=1234, pool=6000, steps=1200, batch=32, lr=2e-3, weight_decay=0.05)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup (step 0 already at peak / warmup), then half a cosine to 0: model.train.get_lr's shape
    in steps. Kept apart from it on purpose: one function for both rounds these lrs differently in the last
    bit, and that changes the committed backbones' bytes (README, "Tiny backbones": checksums)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_vit(cfg: ViTConfig, preprocess: str, log: Callable = print,
                 recipe: dict | None = None) -> dict[str, torch.Tensor]:
    """Multi-label classification of the objects in toy scenes, from ln_post(CLS) @ proj."""
    r = recipe or VIT_RECIPE
    rng = random.Random(r["seed"])
    scenes = [world.draw_scene(rng) for _ in range(r["pool"])]
    classes = sorted({(o["colour"], o["shape"]) for _, objs in scenes for o in objs})
    index = {c: i for i, c in enumerate(classes)}
    images = torch.stack([preprocess_image(img, cfg.image_size, preprocess) for img, _ in scenes])
    labels = torch.zeros(len(scenes), len(classes))
    for n, (_, objs) in enumerate(scenes):
        for o in objs:
            labels[n, index[(o["colour"], o["shape"])]] = 1.0

    torch.manual_seed(r["seed"])
    vit = VisionTransformer(dataclasses.replace(cfg, adapters=False))
    head = nn.Linear(cfg.output_dim, len(classes))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"], betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(r["seed"])
    last = cfg.layers - 1
    t0 = time.time()
    for step in range(r["steps"]):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, r["steps"], r["lr"], r["steps"] // 10)
        idx = torch.randint(len(scenes), (r["batch"],), generator=g)
        cls = vit.ln_post(vit(images[idx], [last])[0][:, 0]) @ vit.proj           # (B, output_dim)
        logits = head(cls)
        loss = F.binary_cross_entropy_with_logits(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            acc = ((logits.detach() > 0).float() == labels[idx]).all(-1).float().mean().item()
            log(f"pretrain ViT  step {step + 1}/{r['steps']} | loss {loss.item():.4f} | "
                f"exact-set accuracy {acc:.2f} | {time.time() - t0:.0f}s")
    return vit.state_dict()


def pretrain_llm(cfg: LlamaConfig, tok, log: Callable = print, recipe: dict | None = None) -> dict[str, torch.Tensor]:
    """A language model (tokens of `tok`) on the toy corpus, in document-aligned packed rows.

    The answer letter of each question document is weighted `answer_weight` times in the loss (it is one
    byte of ~150-300): the tiny analogue of the instruction tuning a chat LLaMA/Vicuna has had, so that
    the frozen decoder already answers questions in the prompt format before any PEFT.
    """
    r = recipe or LM_RECIPE
    docs = world.text_corpus(r["seed"], r["docs"])
    rows, weights = pack_documents(docs, tok, r["seq_len"], r["answer_weight"])
    torch.manual_seed(r["seed"])
    lm = Transformer(cfg)
    opt = torch.optim.AdamW(lm.parameters(), lr=r["lr"], weight_decay=r["weight_decay"], betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(r["seed"])
    t0 = time.time()
    for step in range(r["steps"]):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, r["steps"], r["lr"], r["steps"] // 10)
        idx = torch.randint(len(rows), (r["batch"],), generator=g)
        chunk, w = rows[idx], weights[idx]
        n = int((w > 0).sum(0).nonzero().max()) + 1                     # trim trailing all-padding columns
        chunk, w = chunk[:, :n + 1], w[:, :n]
        with autocast(torch.device("cpu"), torch.bfloat16):     # ~1.7x faster on CPUs with bf16 units
            logits = lm(chunk[:, :-1])
        loss = weighted_next_token_loss(logits, chunk[:, 1:], w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"pretrain LM   step {step + 1}/{r['steps']} | loss {loss.item():.4f} | {time.time() - t0:.0f}s")
    return lm.state_dict()


def _key(*parts) -> str:
    blob = json.dumps([*parts, hashlib.sha256(GENERATOR.read_bytes()).hexdigest(), torch.__version__],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def vit_fits(cfg: Config, recipe: dict | None = None) -> dict:
    """Everything the tiny ViT's pretrained weights depend on, besides the toy world itself."""
    vit = {k: v for k, v in dataclasses.asdict(cfg.vit).items() if not k.startswith("adapter")}
    return {"vit": vit, "recipe": recipe or VIT_RECIPE, "preprocess": cfg.train.preprocess}


def llm_fits(cfg: Config, tok, recipe: dict | None = None) -> dict:
    """Everything the tiny decoder's pretrained weights depend on, besides the toy world itself."""
    vocab = hashlib.sha256(b"\0".join(getattr(tok, "pieces", [b"bytes"]))).hexdigest()
    return {"llama": dataclasses.asdict(cfg.llama), "recipe": recipe or LM_RECIPE, "vocab": vocab}


def _plain(x):
    return json.loads(json.dumps(x))                     # tuples -> lists, as they come back from a file


def read_backbone(path: Path, fits: dict, log: Callable = print) -> dict[str, torch.Tensor] | None:
    """A committed backbone file's tensors, or None (with a one-line note) if it was written for another
    config or recipe. A damaged file is an error, not a silent re-pretraining."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported in one line
        raise CheckpointError(f"{path}: not a readable backbone file ({type(e).__name__}); "
                              f"rewrite it with `python lsrm.py pretrain`") from None
    if not isinstance(blob, dict) or blob.get("format") != BACKBONE_FORMAT:
        raise CheckpointError(f"{path}: not an lsrm tiny backbone (expected format {BACKBONE_FORMAT})")
    if blob["fits"] != _plain(fits):
        diff = [k for k in fits if blob["fits"].get(k) != _plain(fits[k])]
        log(f"{path} was written for another {'/'.join(diff)}: pretraining instead "
            f"(`python lsrm.py pretrain` rewrites it)")
        return None
    return check_finite({k: v.float() for k, v in blob["state"].items()}, path)


def check_finite(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Frozen weights with NaN or inf would train to a NaN loss without a word: refused, naming the tensor."""
    bad = next((k for k, v in state.items() if not all_finite(v)), None)
    if bad is not None:
        raise WeightsError(f"{path}: {bad!r} holds NaN or inf")
    return state


def _cached(path: Path, make: Callable[[], dict], log: Callable) -> dict[str, torch.Tensor]:
    if path.is_file():
        return check_finite(torch.load(path, map_location="cpu", weights_only=True), path)
    log(f"pretraining {path.stem.split('-')[0]} (once; cached in {path})")
    state = check_finite(make(), path)         # a diverged pretraining is not cached
    atomic_save(state, path)
    return state


def _find(what: str, file: str, fits: dict, committed: Path | None, cached: Path, make: Callable[[], dict],
          log: Callable) -> dict[str, torch.Tensor]:
    """The committed file if there is one and it fits, else the cache (pretrained once by `make`)."""
    if committed is not None and (committed / file).is_file():
        state = read_backbone(committed / file, fits, log)
        if state is not None:
            log(f"{what}: the committed {committed / file}")
            return state
    return _cached(cached, make, log)


def pretrained_vit(cfg: Config, cache_dir: Path = CACHE, log: Callable = print,
                   committed: Path | None = BACKBONES) -> dict:
    """The tiny ViT's pretrained weights ('visual.*'): the committed file if it fits, else pretrained once
    and cached by everything they depend on."""
    fits = vit_fits(cfg)
    return _find("ViT", "vit.pt", fits, committed,
                 Path(cache_dir) / f"vit-{_key(fits['vit'], VIT_RECIPE, cfg.train.preprocess)}.pt",
                 lambda: {f"visual.{k}": v for k, v in pretrain_vit(cfg.vit, cfg.train.preprocess, log).items()}, log)


def stepwise_fits(cfg: Config, tok, lm: dict | None = None, stepwise: dict | None = None,
                  read: dict | None = None, vit: dict | None = None, text: dict | None = None) -> dict:
    """Everything the step-wise decoder depends on: the direct decoder's, its own three recipes, and the ViT
    whose pictures stage 6 reads (`lm`, `stepwise`, `read`, `vit`, `text`: recipes, default the real ones)."""
    return {**read_fits(cfg, tok, lm, stepwise, read, vit), "text": text or _stepwise().TEXT_RECIPE}


def read_fits(cfg: Config, tok, lm: dict | None = None, stepwise: dict | None = None,
              read: dict | None = None, vit: dict | None = None) -> dict:
    """What the step-wise decoder after stage 6 (before stage 7) depends on; stepwise_fits without "text"."""
    sw = _stepwise()
    return {**llm_fits(cfg, tok, lm), "stepwise": stepwise or sw.STEPWISE_RECIPE, "read": read or sw.READ_RECIPE,
            "read_vit": vit_fits(cfg, vit)}


def _stepwise():
    from . import stepwise                     # imported late: it imports this module's corpus
    return stepwise


def pretrained_llm(cfg: Config, tok, cache_dir: Path = CACHE, log: Callable = print,
                   committed: Path | None = BACKBONES) -> dict:
    """The tiny decoder's pretrained weights ('llama.*') for tokenizer `tok`, found likewise; with
    train.tiny_decoder=stepwise, the direct one taught further (tiny_data/stepwise.py), found likewise."""
    fits = llm_fits(cfg, tok)
    direct = _find("decoder", "lm.pt", fits, committed,
                   Path(cache_dir) / f"lm-{_key(fits['llama'], LM_RECIPE, fits['vocab'])}.pt",
                   lambda: {f"llama.{k}": v for k, v in pretrain_llm(cfg.llama, tok, log).items()}, log)
    if cfg.train.tiny_decoder == "direct":
        return direct
    fits = stepwise_fits(cfg, tok)
    key = _key(fits["llama"], LM_RECIPE, fits["stepwise"], fits["vocab"])

    read_key = _key(key, fits["read"], fits["read_vit"])

    def read():                                 # stages 1-5 (cached on their own), then stage 6
        stages = _cached(Path(cache_dir) / f"lm_stepwise-{key}.pt", lambda: stepwise_llm(cfg.llama, tok, direct, log),
                         log)
        return read_llm(cfg, tok, pretrained_vit(cfg, cache_dir, log, committed), stages, log)

    def taught():                               # stages 1-6 (cached on their own), then stage 7
        return text_llm(cfg.llama, tok, _cached(Path(cache_dir) / f"lm_read-{read_key}.pt", read, log), log)
    return _find("step-wise decoder", "lm_stepwise.pt", fits, committed,
                 Path(cache_dir) / f"lm_text-{_key(read_key, fits['text'])}.pt", taught, log)


def stepwise_llm(cfg: LlamaConfig, tok, direct: dict[str, torch.Tensor], log: Callable = print,
                 recipe: dict | None = None) -> dict[str, torch.Tensor]:
    """'llama.*' tensors of the step-wise decoder: the direct decoder's, taught by stepwise.teach_stepwise."""
    from .stepwise import teach_stepwise
    llama = Transformer(cfg)
    llama.load_state_dict({k.removeprefix("llama."): v.float() for k, v in direct.items()})
    teach_stepwise(llama, tok, recipe, log)
    return {f"llama.{k}": v.detach().clone() for k, v in llama.state_dict().items()}


def read_llm(cfg: Config, tok, vit: dict[str, torch.Tensor], stepwise: dict[str, torch.Tensor],
             log: Callable = print, recipe: dict | None = None) -> dict[str, torch.Tensor]:
    """'llama.*' tensors of the step-wise decoder after stage 6 (stepwise.teach_read): `stepwise` (stages 1-5)
    trained with a throwaway MemVP memory reading the tiny ViT `vit` ('visual.*')."""
    from .stepwise import READ_RECIPE, teach_read
    r = recipe or READ_RECIPE
    torch.manual_seed(r["seed"])                           # the throwaway memory's init
    model = build(memvp(cfg))
    load_own(model, {**vit, **{k: v.float() for k, v in stepwise.items()}}, "tiny backbones")
    teach_read(model, tok, r, log)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("llama.")}


def text_llm(cfg: LlamaConfig, tok, read: dict[str, torch.Tensor], log: Callable = print,
             recipe: dict | None = None) -> dict[str, torch.Tensor]:
    """'llama.*' tensors of the step-wise decoder after stage 7 (stepwise.teach_text): `read` (stages 1-6) taught
    the hops read from the question and hint."""
    llama = Transformer(cfg)
    llama.load_state_dict({k.removeprefix("llama."): v.float() for k, v in read.items()})
    _stepwise().teach_text(llama, tok, recipe, log)
    return {f"llama.{k}": v.detach().clone() for k, v in llama.state_dict().items()}


def pretrained_backbones(cfg: Config, tok, cache_dir: Path = CACHE, log: Callable = print,
                         committed: Path | None = BACKBONES) -> dict[str, torch.Tensor]:
    """{'visual.*', 'llama.*'} tensors of the tiny backbones: committed, or pretrained once and cached."""
    return {**pretrained_vit(cfg, cache_dir, log, committed), **pretrained_llm(cfg, tok, cache_dir, log, committed)}


SMOKE = dict(vit=dict(pool=64, steps=4, batch=8), lm=dict(docs=64, steps=4, batch=4))   # CI: seconds, not minutes
FILES = ("vit.pt", "lm.pt", "lm_stepwise.pt")


def write_backbones(cfg: Config, tok, out: Path = BACKBONES, smoke: bool = False, log: Callable = print,
                    only: tuple[str, ...] = FILES, read_from: Path | None = None) -> dict[str, str]:
    """Pretrain the tiny backbones and write out/{vit,lm,lm_stepwise}.pt (or those in `only`); {file: sha256}.

    lm_stepwise.pt is the step-wise decoder: out/lm.pt taught by stepwise.py's seven stages (the sixth reads
    out/vit.pt's pictures); with `only` it reads those two files if it does not write them itself. With
    `read_from`, a step-wise decoder file written for the same recipes before stage 7 existed: stage 7 alone,
    taught to that file's decoder (how the committed file was written: tiny_data/README.md).
    Deterministic for a given torch build and thread count (`lsrm.py pretrain` fixes the threads): each
    file is serialised in memory first (torch.save to a path embeds the path's name) and written atomically.
    `smoke` shrinks every recipe to a few steps: files that load, not weights that know anything."""
    from .stepwise import READ_RECIPE, READ_SMOKE, STEPWISE_RECIPE, TEXT_RECIPE, TEXT_SMOKE, smoke_recipe
    unknown = [f for f in only if f not in FILES]
    if unknown:
        raise ValueError(f"unknown backbone file {unknown[0]!r} (known: {', '.join(FILES)})")
    if read_from is not None and only != ("lm_stepwise.pt",):
        raise ValueError("read_from (stage 7 alone) writes lm_stepwise.pt only: give only=('lm_stepwise.pt',)")
    vit_r = {**VIT_RECIPE, **SMOKE["vit"]} if smoke else VIT_RECIPE
    lm_r = {**LM_RECIPE, **SMOKE["lm"]} if smoke else LM_RECIPE
    sw_r = smoke_recipe() if smoke else STEPWISE_RECIPE
    read_r = {**READ_RECIPE, **READ_SMOKE} if smoke else READ_RECIPE
    text_r = {**TEXT_RECIPE, **TEXT_SMOKE} if smoke else TEXT_RECIPE
    states: dict[str, dict] = {}

    def written(name: str, fits: dict) -> dict[str, torch.Tensor]:      # made in this call, or read from out/
        if name in states:
            return states[name]
        state = read_backbone(Path(out) / name, fits, log) if (Path(out) / name).is_file() else None
        if state is None:
            raise WeightsError(f"{Path(out) / name}: missing or written for another recipe; the step-wise decoder "
                               f"is taught from it: write it first (`python lsrm.py pretrain"
                               f"{' --smoke' if smoke else ''} --only {name}`)")
        return state

    def stepwise() -> dict[str, torch.Tensor]:
        if read_from is not None:                                  # stages 1-6 done, in that file
            state = read_backbone(Path(read_from), read_fits(cfg, tok, lm_r, sw_r, read_r, vit_r), lambda *_: None)
            if state is None:
                raise WeightsError(f"{read_from}: not a step-wise decoder of these recipes before stage 7 "
                                   f"(written for another config, recipe or word list)")
        else:
            direct = written("lm.pt", llm_fits(cfg, tok, lm_r))
            vit = written("vit.pt", vit_fits(cfg, vit_r))
            state = read_llm(cfg, tok, vit, stepwise_llm(cfg.llama, tok, direct, log, sw_r), log, read_r)
        return text_llm(cfg.llama, tok, state, log, text_r)

    made = {"vit.pt": (vit_fits(cfg, vit_r), lambda: {f"visual.{k}": v for k, v in
                                                      pretrain_vit(cfg.vit, cfg.train.preprocess, log, vit_r).items()}),
            "lm.pt": (llm_fits(cfg, tok, lm_r), lambda: {f"llama.{k}": v for k, v in
                                                         pretrain_llm(cfg.llama, tok, log, lm_r).items()}),
            "lm_stepwise.pt": (stepwise_fits(cfg, tok, lm_r, sw_r, read_r, vit_r, text_r), stepwise)}
    sums = {}
    for name in (f for f in FILES if f in only):
        fits, make = made[name]
        states[name] = check_finite(make(), Path(out) / name)
        blob = {"format": BACKBONE_FORMAT, "fits": _plain(fits), "torch": str(torch.__version__),
                "threads": torch.get_num_threads(),
                "generator": hashlib.sha256(GENERATOR.read_bytes()).hexdigest(), "state": states[name]}
        buf = io.BytesIO()
        torch.save(blob, buf)
        path = Path(out) / name
        write_atomically(path, lambda tmp: tmp.write_bytes(buf.getvalue()))
        sums[str(path)] = hashlib.sha256(buf.getvalue()).hexdigest()
    return sums

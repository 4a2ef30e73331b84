"""A model, its tokenizer and its data, from a config or from a checkpoint: what every command starts with.

    load_config(name, ["lsrm.delta=0.2"])     a preset with `--set` overrides, checked
    model_from_config(cfg, device)            the frozen backbones + fresh adapters, only adapters trainable
    model_from_checkpoint(path, device)       the same, with a fine-tuned checkpoint's adapters and M switch
    make_tokenizer(cfg), make_dataset(cfg, split, tokenizer)

The frozen backbones come from real checkpoint files (`train.vit_weights`, `train.llm_weights`: CLIP and
LLaMA in any format model/weights.py reads), or, for the tiny configs, from the committed pretrained tiny
backbones (tiny_data/pretrain.py; pretrained once into runs/cache when they do not fit), or are random
(`train.pretrained=false`: smoke tests).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from . import config as C
from .checkpoint import backbone_fingerprint, config_diff, load_adapters, load_checkpoint
from .data import VLDataset, check_images, read_coco, read_scienceqa
from .errors import ConfigError, DataError, MissingPackage, UserError
from .paths import resolve
from .tokenizer import ByteTokenizer
from .vlm import LSRM, build, cast_frozen
from .weights import load_own


def load_config(name: str, overrides: list[str] | None = None) -> C.Config:
    try:
        return C.apply_overrides(C.get_config(name), overrides or [])
    except KeyError as e:                           # an unknown preset; a bad value is a ConfigError already
        raise UserError(e.args[0]) from None


def make_tokenizer(cfg: C.Config):
    if not cfg.train.tokenizer:
        return ByteTokenizer()
    from .tokenizer import load_tokenizer
    path = resolve(cfg.train.tokenizer)
    try:
        tok = load_tokenizer(path)
    except MissingPackage as e:
        raise UserError(f"{path}: {e}") from None
    except (OSError, RuntimeError, UnicodeDecodeError) as e:      # a damaged file, in any tokenizer library
        raise UserError(f"{path}: not a readable tokenizer ({type(e).__name__})") from None
    if tok.vocab_size > cfg.llama.vocab_size:
        raise UserError(f"{path}: {tok.vocab_size} tokens, more than the decoder's vocab_size={cfg.llama.vocab_size}")
    return tok


def tiny_backbones():
    """tiny_data/pretrain.py, which pretrains and finds the tiny backbones: the one import of model/ from outside
    it. It imports model/ but never this file, so no cycle forms (tests/test_imports.py checks both)."""
    from tiny_data import pretrain
    return pretrain


def rank0_first(make):
    """Under torchrun, rank 0 runs `make` first (pretraining into the shared cache); the others then read it."""
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        torch.distributed.barrier()
    out = make()
    if rank == 0 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def model_from_config(cfg: C.Config, device: torch.device, log=print) -> LSRM:
    """The frozen backbones (real checkpoint files, or the tiny pretrained ones) + fresh adapters."""
    t = cfg.train
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[t.frozen_dtype]
    if t.vit_weights and not t.llm_weights:
        raise UserError("train.vit_weights needs train.llm_weights too (only the tiny ViT can be pretrained here)")
    if t.llm_weights:                           # real checkpoints, straight into `dtype` on `device`
        from .weights import load_pretrained
        if t.vit_weights:
            vit = resolve(t.vit_weights)
        elif not C.is_tiny_vit(cfg):
            raise UserError(f"config {cfg.name!r} needs train.vit_weights (its ViT is not the tiny one)")
        else:                                   # `small`: the tiny pretrained ViT + a real decoder
            vit = {k[len("visual."):]: v for k, v in
                   rank0_first(lambda: tiny_backbones().pretrained_vit(cfg, log=log)).items()}
        return load_pretrained(cfg, vit, resolve(t.llm_weights), device=device, dtype=dtype)
    if not t.pretrained:
        torch.manual_seed(t.seed)                 # random frozen backbones, the same in train and eval:
        model = build(cfg)                        # for smoke tests only
    else:
        if not C.is_tiny_vit(cfg):
            raise UserError(f"config {cfg.name!r} needs its backbones: set train.vit_weights and train.llm_weights")
        model = build(cfg)
        load_own(model, rank0_first(lambda: tiny_backbones().pretrained_backbones(cfg, make_tokenizer(cfg), log=log)),
                 "tiny backbones")
    return cast_frozen(model, dtype).to(device)


# What an eval-time --set may change: where the files are, which data and how much of it, batch sizes and
# precision, and what only training reads (the recipe). Not what the adapters were trained against: the
# backbones' shape and source, the memory's shape and scales, the form of the inputs.
EVAL_FREE = ("name", "train.", "vit.adapter_dropout", "llama.max_seq_len", "lsrm.dropout", "lsrm.shift_epoch")
EVAL_FIXED = ("train.task", "train.pretrained", "train.preprocess", "train.captions")


def fixed_at_eval(key: str) -> bool:
    return key in EVAL_FIXED or not any(key == k or (k.endswith(".") and key.startswith(k)) for k in EVAL_FREE)


def model_from_checkpoint(path: str, device, overrides=None, log=print):
    """(config, model in eval mode with the checkpoint's adapters and M switch, tokenizer, checkpoint).
    The request is checked against the checkpoint's config before anything is built."""
    if Path(path).is_dir():
        raise UserError(f"--ckpt {path}: a directory; did you mean {Path(path) / 'checkpoint.pt'}?")
    ckpt = load_checkpoint(Path(path))
    try:
        trained = C.Config.from_dict(ckpt["config"])
        cfg = C.apply_overrides(trained, overrides or [])
    except (TypeError, ConfigError) as e:          # TypeError: a field this version does not know
        raise UserError(f"{path}: {e}") from None
    then, now = trained.to_dict(), cfg.to_dict()
    fixed = [k for k in config_diff(then, now) if fixed_at_eval(k)]
    if fixed:
        k = fixed[0]
        old, new = then, now
        for part in k.split("."):
            old, new = old[part], new[part]
        raise UserError(f"{path}: --set {k}={new} is a different config from the one its adapters were trained "
                        f"with ({k}={old})")
    tokenizer = make_tokenizer(cfg)
    model = model_from_config(cfg, device, log)
    load_adapters(model, ckpt, Path(path))
    model.inheritable = ckpt["inheritable"]          # M applied as it was at the end of training
    fp = backbone_fingerprint(model)
    if any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in zip(fp, ckpt.get("backbone", fp))):
        # on stderr, whatever `log` is: generate and visualize keep their stdout for their output
        print(f"warning: {path} was trained on different frozen backbones than the ones loaded now", file=sys.stderr)
    return cfg, model.eval(), tokenizer, ckpt


def data_fingerprint(cfg: C.Config) -> dict:
    """sha256 of the training data's index files (names and bytes; not where they are), for a checkpoint to
    record and --resume to check. The images are not hashed (100k+ files at full scale): these files list them."""
    root = resolve(cfg.train.data)
    files = (["problems.json", "pid_splits.json"] + (["captions.json"] if cfg.train.captions else [])
             if cfg.train.task == "scienceqa" else ["dataset_coco.json"])
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode() + b"\0")
        try:
            with open(root / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise DataError(f"{root / name}: {e.strerror}") from None
    return {"files": files, "sha256": h.hexdigest()}


def make_dataset(cfg: C.Config, split: str, tokenizer, data: str | None = None, limit: int = 0, log=print):
    """(examples, VLDataset) of one split, every image checked and every item's length checked up front."""
    root = resolve(data or cfg.train.data)
    if cfg.train.task == "scienceqa":
        examples = read_scienceqa(root, split, cfg.train.captions, cfg.train.prompt_format, log)
    else:
        examples = read_coco(root, split, log=log)
    examples = examples[:limit] if limit else examples
    if not check_images(examples, cfg.train.check_images):    # never start on a missing or corrupt image
        log(f"note: {split}: more than train.check_images={cfg.train.check_images} pictures: each was checked to "
            f"exist and is decoded when first read (a bad one stops the run there, in one line naming it)")
    dataset = VLDataset(examples, tokenizer, cfg.vit.image_size, cfg.train.preprocess, cfg.train.max_len,
                        cache_mb=cfg.train.image_cache_mb)
    dataset.check_lengths(root / ("problems.json" if cfg.train.task == "scienceqa" else "dataset_coco.json"), log)
    return examples, dataset

"""Fine-tuning LSRM (method.md §7): the recipe, gradient accumulation, DDP, resumable checkpoints.

- Loss: cross-entropy on the answer tokens only, averaged over the answer tokens of the whole effective
  batch (all micro-batches, all processes), so 1 process x 32 and 2 processes x 16 take the same step.
- AdamW (0.9, 0.95); weight decay on >= 2-D trainable weights only (not biases, not Λ).
- lr = base_lr * batch / 256; linear warmup per iteration, then half-cycle cosine to 0.
- Inheritable cross-attention switched on from `lsrm.shift_epoch`.
- Every epoch sees a fresh permutation; the last incomplete batch is dropped, so every process takes
  the same number of equal micro-batches.
- Checkpoints hold only the trainable parameters, optimizer state, RNG state, config and step; they are
  written atomically (tmp file + rename), and `resume` continues exactly where the run stopped.
- A non-finite loss stops the run before that step is taken, and no checkpoint with NaN or inf in it is
  written or loaded: the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import Config
from .vlm import LSRM, adapter_state_dict, is_adapter

CKPT_FORMAT = "lsrm-adapters-v1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not fit the model: one line naming the file."""


class Diverged(ValueError):
    """A non-finite loss or adapter weight: training stops at that step, saying which checkpoint is kept."""


# What a run writes into its directory. A new run there (--overwrite) removes the old run's files first.
RUN_FILES = ("checkpoint.pt", "log.jsonl", "metrics.json", "predictions.jsonl")
# Options a resumed run may change: where the data is (its contents are checked by fingerprint), how often
# it logs and checkpoints, how it is evaluated at the end.
RESUME_FREE = ("train.data", "train.log_every", "train.ckpt_every", "train.eval_split", "train.eval_batch")


# ---------------------------------------------------------------------------------------------
# Recipe

def get_lr(epoch: float, cfg: Config) -> float:
    """lr at a fractional epoch: linear warmup, then half-cycle cosine to 0 (MAE/MemVP's schedule)."""
    t = cfg.train
    peak = t.base_lr * t.batch_size / 256
    if epoch < t.warmup_epochs:
        return peak * epoch / t.warmup_epochs
    progress = (epoch - t.warmup_epochs) / max(t.epochs - t.warmup_epochs, 1e-8)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)       # biases, Λ and norms: no decay
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.train.beta1, cfg.train.beta2))


def answer_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over supervised positions (targets != -100)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def autocast(device: torch.device, frozen_dtype: torch.dtype = torch.float32):
    """bf16 autocast on CUDA, and on CPU when the frozen weights are bf16; else full precision."""
    if device.type == "cuda" or frozen_dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inheritable_at(cfg: Config, epoch: int) -> bool:
    return cfg.lsrm.inheritable and epoch >= cfg.lsrm.shift_epoch


# ---------------------------------------------------------------------------------------------
# Distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

def distributed() -> tuple[int, int]:
    """(rank, world). Initialises the process group under torchrun: gloo on CPU, nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# ---------------------------------------------------------------------------------------------
# Checkpoints

def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file in the same directory, then rename it to `path`: a crash never
    leaves half a file (the rename is atomic), and a failed write leaves the old file and no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())           # on disk before the rename: a power cut leaves the old file or the new
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)                   # first: a full disk is then an OSError, not torch's "unexpected pos"
    write_atomically(path, lambda tmp: tmp.write_bytes(buf.getbuffer()))


def keep_history(path: Path, step: int, log: Callable[[str], None] = print) -> None:
    """Drop the log.jsonl lines after `step` (the checkpoint resumed from): those steps run again. A last
    line cut short (a crash or a full disk in the middle of writing it) is dropped with a note."""
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            logged = record["step"]
        except (ValueError, KeyError, TypeError):
            if n < len(lines):
                raise CheckpointError(f"{path}: line {n} is not a log record (the file is damaged): "
                                      f"remove that line to resume") from None
            log(f"note: {path}: its last line was cut short ({line[:40]!r}...): dropped")
            break
        if logged <= step:
            kept.append(line + "\n")
    if "".join(kept) != text:
        write_atomically(path, lambda tmp: tmp.write_text("".join(kept)))


class StopOnInterrupt:
    """Ctrl-C (SIGINT) while training: the first one lets the current step finish, then the loop checkpoints
    and stops (`requested`); a second one interrupts at once. Only the main thread can take signals."""

    def __init__(self):
        self.requested, self.previous = False, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported in one line
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not an lsrm checkpoint (expected format {CKPT_FORMAT})")
    return ckpt


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)) and list(va) == list(vb)):
            out.append(f"{prefix}{k}")
    return out


def load_adapters(model: LSRM, ckpt: dict, path: Path) -> None:
    """Put a checkpoint's trainable tensors into the model; every key and shape must match."""
    want = adapter_state_dict(model)
    got = ckpt["adapters"]
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not fit this model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); was it trained with a different config?")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in got:
                if got[name].shape != p.shape:
                    raise CheckpointError(f"{path}: {name} has shape {tuple(got[name].shape)}, "
                                          f"the model expects {tuple(p.shape)}: a different config")
                if not torch.isfinite(got[name]).all():
                    raise CheckpointError(f"{path}: {name} holds NaN or inf: the run that wrote it diverged")
                p.copy_(got[name])


def check_resume(ckpt: dict, cfg: Config, path: Path, data: Optional[dict] = None, log=print) -> None:
    """A checkpoint continues only the run it was written by: the same config (but RESUME_FREE) and, when
    `data` (data fingerprint: {"files", "sha256"}) is given, the same training data."""
    try:                                            # an older checkpoint's config, with today's defaults
        then = Config.from_dict(ckpt["config"]).to_dict()
    except (TypeError, ValueError, KeyError):
        then = ckpt["config"]
    diff = [k for k in config_diff(then, cfg.to_dict()) if k not in RESUME_FREE]
    if diff:
        raise CheckpointError(f"{path}: written with a different config ({', '.join(diff[:5])})")
    if data is None:
        return
    if not ckpt.get("data"):
        log(f"note: {path} records no fingerprint of its training data (an older checkpoint): not checked")
    elif ckpt["data"]["sha256"] != data["sha256"]:
        raise CheckpointError(f"{path}: trained on other data: {' / '.join(data['files'])} changed since "
                              f"(sha256 {ckpt['data']['sha256'][:12]} then, {data['sha256'][:12]} now); resume "
                              f"with the data it was trained on, or start a new run")


def backbone_fingerprint(model: LSRM) -> list[float]:
    """Two numbers that change when the frozen weights change (a checkpoint needs its own backbones)."""
    s = a = 0.0
    for name, p in model.named_parameters():
        if not is_adapter(name):
            s += p.detach().double().sum().item()
            a += p.detach().double().abs().sum().item()
    return [s, a]


# ---------------------------------------------------------------------------------------------
# The loop

def batch_indices(n: int, cfg: Config, epoch: int, i: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches for step i of an epoch: a slice of a per-epoch permutation."""
    t = cfg.train
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed * 100_003 + epoch))
    step = perm[i * t.batch_size:(i + 1) * t.batch_size].tolist()        # the global batch
    mine = step[rank * (t.batch_size // world):(rank + 1) * (t.batch_size // world)]
    return [mine[j:j + t.micro_batch] for j in range(0, len(mine), t.micro_batch)]


def train(cfg: Config, model: LSRM, dataset, collate: Callable, out_dir: Path, *, resume: bool = False,
          stop_after: Optional[int] = None, log: Callable[[str], None] = print,
          device: Optional[torch.device] = None, data: Optional[dict] = None) -> dict:
    """Fine-tune the adapters of `model` on `dataset`; writes out_dir/{checkpoint.pt, log.jsonl}.

    `stop_after` ends the run after that many optimizer steps (in total), checkpointing first:
    an interruption that `resume=True` continues from. Ctrl-C does the same at the end of the current
    step (the summary then has "interrupted": True). `data`, the data's fingerprint, is recorded in the
    checkpoint and checked on resume. A fresh run removes an old run's RUN_FILES before it starts.
    """
    t = cfg.train
    rank, world = distributed()
    device = device or default_device()
    out_dir = Path(out_dir)
    if t.batch_size % world:
        raise ValueError(f"train.batch_size={t.batch_size} does not split over {world} processes")
    steps_per_epoch = len(dataset) // t.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{t.data}: {len(dataset)} training items, fewer than one batch of {t.batch_size}")
    total = steps_per_epoch * t.epochs

    torch.manual_seed(t.seed)
    frozen = model.llama.norm.weight.dtype
    opt = make_optimizer(model, cfg)
    ckpt_path = out_dir / "checkpoint.pt"
    step = 0
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        check_resume(ckpt, cfg, ckpt_path, data, log)
        load_adapters(model, ckpt, ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        log(f"resumed from {ckpt_path} at step {step}")
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model

    def kept() -> str:
        return (f"the last checkpoint, {ckpt_path} (step {saved}), is intact" if saved else
                "no checkpoint was written")

    def save(step: int):
        if rank == 0:
            adapters = adapter_state_dict(model)
            bad = next((k for k, v in adapters.items() if not torch.isfinite(v).all()), None)
            if bad is not None:
                raise Diverged(f"step {step}: {bad} holds NaN or inf: training stopped; {kept()}")
            try:
                atomic_save({"format": CKPT_FORMAT, "config": cfg.to_dict(), "step": step,
                             "epoch": step / steps_per_epoch, "adapters": adapters,
                             "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                             "inheritable_used": model.inheriting, "data": data,
                             "backbone": backbone_fingerprint(model)}, ckpt_path)
            except OSError as e:
                raise CheckpointError(f"{ckpt_path}: cannot be written at step {step} ({e.strerror or e}); "
                                      f"{kept()}: make room, then continue with --resume") from None

    model.train()
    model.inherit(inheritable_at(cfg, (step - 1) // steps_per_epoch) if step else False)   # as after `step` steps
    history_file = out_dir / "log.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            keep_history(history_file, step, log)
        else:
            for name in RUN_FILES:             # --overwrite: nothing of the old run is left beside the new one
                (out_dir / name).unlink(missing_ok=True)
    fresh = not resume                         # a new run replaces log.jsonl at its first step, not before
    t0, first = time.time(), step
    last_loss, saved, interrupted = float("nan"), step, False
    with StopOnInterrupt() as interrupt:
        while step < total and (stop_after is None or step < stop_after):
            if stop_requested(interrupt, device, world):
                interrupted = True
                break
            epoch, i = divmod(step, steps_per_epoch)
            lr = get_lr(step / steps_per_epoch, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            model.inherit(inheritable_at(cfg, epoch))          # M applied from lsrm.shift_epoch on
            batches = [collate([dataset[j] for j in chunk]) for chunk in batch_indices(len(dataset), cfg, epoch, i, rank, world)]
            n_tok = all_sum(sum((b["targets"] != -100).sum() for b in batches).to(device).float())
            loss_sum = torch.zeros((), device=device)
            for k, b in enumerate(batches):
                sync = k == len(batches) - 1 or world == 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast(device, frozen):
                    images = b["images"].to(device) if b["has_image"].any() else None    # text-only: skip the ViT
                    logits = ddp(b["tokens"].to(device), images, b["has_image"].to(device))
                    loss = answer_loss_sum(logits, b["targets"].to(device))
                    (loss * world / n_tok).backward()          # DDP averages over processes: undo that
                loss_sum += loss.detach()
            last_loss = (all_sum(loss_sum) / n_tok).item()
            if not math.isfinite(last_loss):       # diverged (bf16 overflow, too high a rate): the step is not taken
                raise Diverged(f"step {step + 1}: the loss is {last_loss}: training stopped; {kept()}")
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if rank == 0:
                try:
                    with open(history_file, "w" if fresh else "a") as f:
                        f.write(json.dumps({"step": step, "epoch": epoch, "loss": last_loss, "lr": lr}) + "\n")
                except OSError as e:
                    raise CheckpointError(f"{history_file}: cannot be written at step {step} ({e.strerror or e}); "
                                          f"{kept()}: make room, then continue with --resume") from None
                fresh = False
                if (t.log_every and step % t.log_every == 0) or step == total or step == first + 1:
                    dt = (time.time() - t0) / (step - first)
                    log(f"step {step:5d}/{total} | epoch {epoch + 1}/{t.epochs} | loss {last_loss:.4f} | lr {lr:.2e} "
                        f"| {dt * 1000:.0f} ms/step | ETA {fmt_time(dt * (total - step))}" + (" | inheritable CA on" if model.inheriting else ""))
            if step % steps_per_epoch == 0 or (t.ckpt_every and step % t.ckpt_every == 0) or step == stop_after:
                save(step)
                saved = step
        interrupted = interrupted or interrupt.requested       # pressed during the last step
        if interrupted and saved != step:
            save(step)                         # Ctrl-C: the step in hand, written atomically
    if dist.is_initialized():
        dist.barrier()
    return {"step": step, "total": total, "loss": last_loss, "seconds": time.time() - t0,
            "interrupted": interrupted}


def stop_requested(interrupt: StopOnInterrupt, device, world: int) -> bool:
    """Has Ctrl-C been pressed (in any process: all of them must stop at the same step)?"""
    if world == 1:
        return interrupt.requested
    return all_sum(torch.tensor(float(interrupt.requested), device=device)).item() > 0


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

"""A run's checkpoint: only what training changes (the adapters), and enough to resume exactly.

    adapters_checkpoint(...)    the dict a checkpoint holds (format CKPT_FORMAT)
    atomic_save(obj, path)      written whole or not at all (write_atomically: tmp file + rename)
    load_checkpoint(path)       read back, checked, older checkpoints' keys brought up to date
    load_adapters(model, ckpt)  its trainable tensors into a model (every key and shape must match)
    check_resume(ckpt, cfg)     it continues only the run it was written by
    backbone_fingerprint(model) two numbers that change when the frozen weights change
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from .config import Config
from .errors import CheckpointError, ConfigError
from .vlm import LSRM, adapter_state_dict, is_adapter

CKPT_FORMAT = "lsrm-adapters-v1"

# Options a resumed run may change: they move no number. Where the data is (its contents are checked by
# fingerprint), how batches are built, how often it logs and checkpoints, how it is evaluated at the end.
RESUME_FREE = ("train.data", "train.workers", "train.image_cache_mb", "train.check_images", "train.log_every",
               "train.ckpt_every", "train.eval_split", "train.eval_batch")


def adapters_checkpoint(cfg: Config, model: LSRM, step: int, epoch: float, optimizer: torch.optim.Optimizer,
                        rng_states: list, data: Optional[dict], backbone: Optional[list[float]]) -> dict:
    """What a checkpoint holds: the adapters, the optimizer's state, every process's random states (`rng`: this
    one's CPU state, as older checkpoints had only it), the config, the step and fractional epoch, whether M is
    applied, the training data's fingerprint and the frozen backbones' (`backbone_fingerprint`)."""
    return {"format": CKPT_FORMAT, "config": cfg.to_dict(), "step": step, "epoch": epoch,
            "adapters": adapter_state_dict(model), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "rng_states": rng_states, "inheritable": model.inheritable, "data": data, "backbone": backbone}


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
    except OSError as e:                   # named by the file meant, not by its temporary
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)                   # first: a full disk is then an OSError, not torch's "unexpected pos"
    write_atomically(path, lambda tmp: tmp.write_bytes(buf.getbuffer()))


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
    if "inheritable_used" in ckpt:                      # older checkpoints' name for the M switch
        ckpt["inheritable"] = ckpt.pop("inheritable_used")
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
    except (TypeError, ConfigError, KeyError):
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
    """Two numbers that change when the frozen weights change (a checkpoint needs its own backbones): the sum
    and the absolute sum of every frozen weight, accumulated in float64 over 4M-element chunks, so no copy of
    a whole weight is made (a float64 copy of LLaMA-3's embedding alone is 4.2 GB). Computed once per run."""
    s = a = 0.0
    for name, p in model.named_parameters():
        if not is_adapter(name):
            for chunk in p.detach().reshape(-1).split(1 << 22):
                s += torch.sum(chunk, dtype=torch.float64).item()
                a += torch.sum(chunk.abs(), dtype=torch.float64).item()
    return [s, a]

"""Fine-tuning LSRM: the recipe, gradient accumulation, DDP, resumable checkpoints.

- Loss: cross-entropy on the answer tokens only, averaged over the answer tokens of the whole effective
  batch (all micro-batches, all processes), so 1 process x 32 and 2 processes x 16 take the same step.
- AdamW (0.9, 0.95); weight decay on >= 2-D trainable weights only (not biases, not Λ).
- lr = base_lr * batch / 256; linear warmup per iteration, then half-cycle cosine to 0.
- Inheritable cross-attention switched on from `lsrm.shift_epoch`.
- Every epoch sees a fresh permutation; the last incomplete batch is dropped, so every process takes
  the same number of equal micro-batches. DataLoader workers build them (`train.workers`) in that order.
- Checkpoints (model/checkpoint.py) hold only the trainable parameters, optimizer state, every process's RNG
  states, config and step; they are written atomically (tmp file + rename) by rank 0, which alone reads them
  back and sends them to the others (no shared filesystem needed for the run directory), and `resume`
  continues exactly where the run stopped. Ctrl-C and SIGTERM (a cluster's preemption) finish the step in hand and checkpoint it.
- A non-finite loss stops the run before that step is taken, and no checkpoint with NaN or inf in it is
  written or loaded: the last good checkpoint stays.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import (adapters_checkpoint, atomic_save, backbone_fingerprint, check_resume, load_adapters,
                         load_checkpoint, write_atomically)
from .config import Config
from .errors import CheckpointError, ConfigError, DataError, Diverged, LsrmError
from .vlm import LSRM, adapter_state_dict


# What a run writes into its directory. A new run there (--overwrite) removes the old run's files first.
RUN_FILES = ("checkpoint.pt", "log.jsonl", "metrics.json", "predictions.jsonl")


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
    """Summed next-token cross-entropy over supervised positions (targets != -100): logits (B, T, V) with
    targets (B, T), or logits (n, V) of the answer positions only with their targets (n,)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def autocast(device: torch.device, frozen_dtype: torch.dtype = torch.float32):
    """Autocast follows the frozen weights: bf16 weights -> bf16 autocast (CUDA or CPU); fp32 weights -> none,
    everything in fp32 (autocasting fp32 weights to bf16 would cast each matrix on every forward and keep the
    copy for backward: a second backbone). fp16 weights are refused for training (`check_precision`)."""
    if frozen_dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_precision(frozen_dtype: str | torch.dtype) -> None:
    """fp16 frozen weights would need fp16 autocast and loss scaling (a GradScaler), which this recipe has not:
    refused before anything is loaded. bf16 (the default on CUDA) has fp32's range and needs none."""
    if frozen_dtype in ("float16", torch.float16):
        raise ConfigError("train.frozen_dtype=float16: training runs in bf16 (or fp32) and has no loss scaling "
                         "for fp16; use train.frozen_dtype=bfloat16 (or auto) or float32")


def inheritable_at(cfg: Config, epoch: int) -> bool:
    """LSRM.inheritable in `epoch` (counted from 0): M is applied from lsrm.shift_epoch on, if at all."""
    return cfg.lsrm.inheritable and epoch >= cfg.lsrm.shift_epoch


# ---------------------------------------------------------------------------------------------
# Distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)

CPU_WAIT = datetime.timedelta(hours=12)      # the CPU group's timeout: rank 0's evaluation may take an hour
_cpu_group = None


def distributed() -> tuple[int, int]:
    """(rank, world). Initialises the process group under torchrun: gloo on CPU; on CUDA each process first
    takes its GPU (LOCAL_RANK) and names it to nccl, so no process touches another's GPU (GPU 0 above all).
    A second, gloo group with a long timeout carries the CPU-side messages (`from_rank0`, RNG states, waiting
    for rank 0's evaluation), which NCCL's 10-minute watchdog would cut short."""
    global _cpu_group
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(gpu)
            dist.init_process_group("nccl", device_id=gpu)
        else:
            dist.init_process_group("gloo")
        _cpu_group = dist.new_group(backend="gloo", timeout=CPU_WAIT)
    return dist.get_rank(), dist.get_world_size()


def from_rank0(fn: Callable, share: bool = True):
    """Rank 0 runs fn(); every process gets its result (None with share=False), or raises its error (one of the
    project's: one message on every process, so all stop alike). Only rank 0 reads the run directory: on 2 nodes the
    second needs no shared filesystem for it."""
    if not dist.is_initialized():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except LsrmError as e:                      # UserError, DataError, CheckpointError: one line each
            error = e
    box = [(result if share else None, error)]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    if box[0][1] is not None:
        raise box[0][1]
    return result if dist.get_rank() == 0 else box[0][0]


def leave_group() -> None:
    """Every process waits here for the others (rank 0 may evaluate for an hour: a barrier on the CPU group),
    then leaves the group: all exit together, so no node's torchrun gives up waiting for another's."""
    if dist.is_initialized():
        dist.barrier(group=_cpu_group)
        dist.destroy_process_group()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# ---------------------------------------------------------------------------------------------
# The run: its log, signals, workers, random states

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
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption) while training: the first one lets the current step
    finish, then the loop checkpoints and stops (`requested`); a second Ctrl-C interrupts at once. A second
    SIGTERM changes nothing (a scheduler and torchrun may each send one). Only the main thread takes signals."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.previous = False, {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class QuietWorkers:
    """A DataLoader's worker_init_fn: its workers ignore Ctrl-C, and SIGTERM while the training loop runs (a
    terminal or a scheduler signals every process; a worker that died would fail the step the training process
    is finishing). Once the loop is over (`over()`), SIGTERM ends a worker again, as the DataLoader's and
    Python's shutdown expect of one that does not stop when asked."""

    def __init__(self):
        self.running = multiprocessing.RawValue("b", 1)          # shared memory: the workers inherit it

    def __call__(self, _worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        if not self.running.value:
            os._exit(128 + signum)

    def over(self) -> None:
        self.running.value = 0


def rng_states(device: torch.device) -> dict:
    """This process's random state: the CPU generator, and its GPU's (dropout on CUDA draws from it)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_states(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_to_rank0(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere), over the CPU group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=_cpu_group)
    return out


def any_process(flags: list[bool], device, world: int) -> list[bool]:
    """Each flag or-ed over the processes (one all-reduce): all of them must stop at the same step."""
    if world == 1:
        return list(flags)
    return [x > 0 for x in all_sum(torch.tensor([float(f) for f in flags], device=device)).tolist()]


def ddp_wrap(model: LSRM) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the trainable parameters only: the frozen backbone (14 GB at 7B), which every process loaded
    from the same files, is neither broadcast from rank 0 at wrap time nor bucketed. find_unused_parameters:
    a batch without pictures leaves the ViT adapters and projectors without a gradient."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


# ---------------------------------------------------------------------------------------------
# The loop

def epoch_permutation(n: int, cfg: Config, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch))


def step_micro_batches(perm: torch.Tensor, cfg: Config, i: int, rank: int, world: int,
                       lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
    """This process's micro-batches for step i of an epoch whose permutation is perm. With the items' token
    `lengths`, this process's items are cut into micro-batches shortest first: the step's gradient is the same
    (the loss is summed over all of them, then divided by their answer tokens), and a micro-batch is padded
    to its own longest item, not to the step's (the tiny set: 30% fewer tokens in two micro-batches)."""
    t = cfg.train
    step = perm[i * t.batch_size:(i + 1) * t.batch_size].tolist()        # the global batch
    mine = step[rank * (t.batch_size // world):(rank + 1) * (t.batch_size // world)]
    if lengths is not None:
        mine = sorted(mine, key=lengths.__getitem__)                      # stable: ties keep the permutation's order
    return [mine[j:j + t.micro_batch] for j in range(0, len(mine), t.micro_batch)]


def batch_indices(n: int, cfg: Config, epoch: int, i: int, rank: int, world: int,
                  lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
    """This process's micro-batches for step i of an epoch: a slice of a per-epoch permutation."""
    return step_micro_batches(epoch_permutation(n, cfg, epoch), cfg, i, rank, world, lengths)


class StepSampler(torch.utils.data.Sampler):
    """This process's micro-batches (lists of item indices) for steps start..end-1 in training order: exactly
    `batch_indices` step after step, each epoch's permutation drawn once (not once per step). Starting at a
    resumed step gives the same micro-batches the uninterrupted run took from there."""

    def __init__(self, n: int, cfg: Config, rank: int, world: int, start: int, end: int,
                 lengths: Optional[Sequence[int]] = None):
        self.n, self.cfg, self.rank, self.world, self.start, self.end = n, cfg, rank, world, start, end
        self.lengths = lengths
        self.steps_per_epoch = n // cfg.train.batch_size
        self.per_step = math.ceil(cfg.train.batch_size // world / cfg.train.micro_batch)

    def __len__(self) -> int:
        return max(self.end - self.start, 0) * self.per_step

    def __iter__(self):
        perm, perm_epoch = None, None
        for step in range(self.start, self.end):
            epoch, i = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.n, self.cfg, epoch), epoch
            yield from step_micro_batches(perm, self.cfg, i, self.rank, self.world, self.lengths)


class Batches(torch.utils.data.Dataset):
    """A micro-batch's indices -> its collated batch, with the flat indices of its answer positions ("positions",
    (n,)) and their targets ("answers", (n,)): built in a DataLoader worker. A bad item (an image that will not
    decode) comes back as its DataError, not raised: the loop reports it in one line (a worker's exception
    would arrive wrapped in its traceback) after checkpointing the steps before it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, chunk: list[int]):
        try:
            b = self.dataset.collate([self.dataset[j] for j in chunk])
        except DataError as e:
            return e
        flat = b["targets"].reshape(-1)
        b["positions"] = (flat != -100).nonzero()[:, 0]
        b["answers"] = flat[b["positions"]]
        return b


def small_as_numpy(b):
    """The loader's collate_fn (in the worker): a batch's tensors but the pictures as numpy arrays, which travel
    pickled in the pipe. A tensor leaves a worker through a shared-memory file and a descriptor of its own
    (~0.25 ms of CPU in the worker and as much in the training process, measured): a micro-batch's five small
    tensors cost as much again as its pictures."""
    return b if isinstance(b, DataError) else {k: v if k == "images" else v.numpy() for k, v in b.items()}


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose batches come back with every entry a tensor again (see small_as_numpy)."""

    def __iter__(self):
        for b in super().__iter__():
            yield b if isinstance(b, DataError) else {k: torch.as_tensor(v) for k, v in b.items()}


def token_lengths(dataset) -> Optional[list[int]]:
    """Each item's tokens, where the dataset tells them without decoding its pictures (VLDataset), else None
    (the micro-batches then keep the permutation's order)."""
    lengths = getattr(dataset, "token_lengths", None)
    return lengths() if callable(lengths) else None


def make_loader(dataset, cfg: Config, rank: int, world: int, start: int, end: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The micro-batches of steps start..end-1 for this process, built by `train.workers` processes (0: here),
    in pinned memory on CUDA. The loader draws its workers' seeds from its own generator, not from the
    training's (whose dropout masks must not move)."""
    t = cfg.train
    return Loader(
        Batches(dataset), sampler=StepSampler(len(dataset), cfg, rank, world, start, end, token_lengths(dataset)),
        batch_size=None, collate_fn=small_as_numpy, num_workers=t.workers, pin_memory=device.type == "cuda",
        worker_init_fn=QuietWorkers() if t.workers else None, generator=torch.Generator().manual_seed(t.seed))


def train(cfg: Config, model: LSRM, dataset, out_dir: Path, *, resume: bool = False,
          stop_after: Optional[int] = None, log: Callable[[str], None] = print,
          device: Optional[torch.device] = None, data: Optional[dict] = None) -> dict:
    """Fine-tune the adapters of `model` on `dataset` (batched by its `collate`); writes out_dir/{checkpoint.pt,
    log.jsonl}.

    `stop_after` ends the run after that many optimizer steps (in total), checkpointing first:
    an interruption that `resume=True` continues from. Ctrl-C or SIGTERM does the same at the end of the
    current step (the summary then has "interrupted": True). `data`, the data's fingerprint, is recorded in
    the checkpoint and checked on resume. A fresh run removes an old run's RUN_FILES before it starts.
    """
    t = cfg.train
    rank, world = distributed()
    device = device or default_device()
    out_dir = Path(out_dir)
    check_precision(model.llama.norm.weight.dtype)
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} does not split over {world} processes")
    steps_per_epoch = len(dataset) // t.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{t.data}: {len(dataset)} training items, fewer than one batch of {t.batch_size}")
    total = steps_per_epoch * t.epochs

    torch.manual_seed(t.seed + 1_000_003 * rank)   # dropout masks of each process its own; rank 0's as 1 process's
    frozen = model.llama.norm.weight.dtype
    opt = make_optimizer(model, cfg)
    ckpt_path = out_dir / "checkpoint.pt"
    step = 0
    if resume:
        ckpt = from_rank0(lambda: load_checkpoint(ckpt_path))      # rank 0 reads it, the others receive it
        check_resume(ckpt, cfg, ckpt_path, data, log)
        load_adapters(model, ckpt, ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        states = ckpt.get("rng_states")                  # one per process (older checkpoints: rank 0's CPU state)
        if states is not None and len(states) == world:
            set_rng_states(states[rank], device)
        else:
            if rank == 0:
                torch.set_rng_state(ckpt["rng"])
            if world > 1 or states is not None:
                log(f"note: {ckpt_path} holds the random state of {len(states) if states else 1} process(es), this "
                    f"run has {world}: its dropout masks differ from an uninterrupted run's")
        step = ckpt["step"]
        log(f"resumed from {ckpt_path} at step {step}")
    ddp = ddp_wrap(model) if world > 1 else model
    fingerprint = backbone_fingerprint(model) if rank == 0 else None      # once: the frozen weights never change

    def kept() -> str:
        return (f"the last checkpoint, {ckpt_path} (step {saved}), is intact" if saved else
                "no checkpoint was written")

    def save(step: int):
        states = gather_to_rank0(rng_states(device))                       # every process takes part
        if rank == 0:
            bad = next((k for k, v in adapter_state_dict(model).items() if not torch.isfinite(v).all()), None)
            if bad is not None:
                raise Diverged(f"step {step}: {bad} holds NaN or inf: training stopped; {kept()}")
            try:
                atomic_save(adapters_checkpoint(cfg, model, step, step / steps_per_epoch, opt, states, data,
                                                fingerprint), ckpt_path)
            except OSError as e:
                raise CheckpointError(f"{ckpt_path}: cannot be written at step {step} ({e.strerror or e}); "
                                      f"{kept()}: make room, then continue with --resume") from None

    model.train()
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
    end = total if stop_after is None else min(total, stop_after)
    feed = make_loader(dataset, cfg, rank, world, step, end, device)
    loader, per_step, quiet = iter(feed), feed.sampler.per_step, feed.worker_init_fn   # quiet: None without workers
    with StopOnInterrupt() as interrupt, contextlib.ExitStack() as after:
        if quiet is not None:
            after.callback(quiet.over)         # however the loop ends, SIGTERM may end the workers again
        while step < end:
            batches = [next(loader) for _ in range(per_step)]            # built ahead by the workers
            bad = next((b for b in batches if isinstance(b, DataError)), None)
            stop, broken = any_process([interrupt.requested, bad is not None], device, world)
            if broken:                         # an image that does not decode: keep the steps done, say which
                if saved != step:
                    save(step)
                raise DataError(f"{bad if bad else 'another process met an unreadable item'} (training stopped at "
                                f"step {step}/{total}, checkpointed in {ckpt_path}: fix it and continue with --resume)")
            if stop:
                interrupted = True
                break
            epoch, i = divmod(step, steps_per_epoch)
            lr = get_lr(step / steps_per_epoch, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            model.inheritable = inheritable_at(cfg, epoch)     # M applied from lsrm.shift_epoch on
            n_tok = all_sum(torch.tensor(float(sum(len(b["answers"]) for b in batches)), device=device))
            loss_sum = torch.zeros((), device=device)
            for k, b in enumerate(batches):
                sync = k == len(batches) - 1 or world == 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with autocast(device, frozen):
                        # which items have a picture is read on the CPU (has_image stays there): no device sync
                        images = b["images"].to(device, non_blocking=True) if b["has_image"].any() else None
                        logits = ddp(b["tokens"].to(device, non_blocking=True), images, b["has_image"],
                                     positions=b["positions"].to(device, non_blocking=True))   # (n, V): answers only
                        loss = answer_loss_sum(logits, b["answers"].to(device, non_blocking=True))
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
                        f"| {dt * 1000:.0f} ms/step | ETA {fmt_time(dt * (total - step))}" + (" | inheritable CA on" if model.inheritable else ""))
            if step % steps_per_epoch == 0 or (t.ckpt_every and step % t.ckpt_every == 0) or step == stop_after:
                save(step)
                saved = step
        interrupted = interrupted or any_process([interrupt.requested], device, world)[0]   # during the last step
        if interrupted and saved != step:
            save(step)                         # Ctrl-C or SIGTERM: the step in hand, written atomically
    if dist.is_initialized():
        dist.barrier()
    return {"step": step, "total": total, "loss": last_loss, "seconds": time.time() - t0,
            "interrupted": interrupted}


def fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

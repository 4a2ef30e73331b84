#!/usr/bin/env python3
"""lsrm: the one command-line entry point.

    python lsrm.py train                                   tiny backbones (committed) + LSRM fine-tune + test
    python lsrm.py eval --ckpt runs/tiny/checkpoint.pt     the accuracy table (or BLEU/CIDEr for COCO)
    python lsrm.py generate --ckpt ... --image P --prompt "..."   greedy decoding, streamed
    python lsrm.py params --config llama-7b [--json]       trainable / total parameters, by group
    python lsrm.py ablate | visualize | probe | bench      Table 5, Figures 3 and 5, the ViT probe, speed

Each command's options: `python lsrm.py COMMAND --help`. The work is in model/ (the model), tools/ (ablate,
bench, visualize) and tiny_data/ (the toy world, its backbones, the probe); this file only parses and prints.

Options of the config are set with `--set key=value` (e.g. `--set train.epochs=5 --set lsrm.delta=0.2`);
an unknown key is an error that lists the valid ones. Multi-process: `torchrun --nproc_per_node=K lsrm.py train`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from model import config as C
from model.assemble import data_fingerprint, load_config, make_dataset, make_tokenizer, model_from_checkpoint
from model.data import load_pixels
from model.errors import LsrmError, UserError
from model.evaluate import evaluate, report, save
from model.pipeline import run
from model.rundir import check_out_file, check_resumable, check_run_dir, check_writable, hold_run_dir
from model.train import check_precision, default_device, distributed, fmt_time, from_rank0, leave_group
from model.vlm import build, param_groups


class Interrupted(Exception):
    """Ctrl-C: one line saying what was kept; exit status 130 (128 + SIGINT), as shells expect."""


class TextStream:
    """`LSRM.generate`'s on_token for one sequence: writes the text as soon as its tokens form whole characters
    (a byte token may be half of one); `rest()` is whatever is left (an incomplete character shows as �)."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write, self.pending = tokenizer, write, []

    def __call__(self, tok: torch.Tensor) -> None:
        self.pending.append(int(tok[0]))
        text = self.tokenizer.decode(self.pending)
        if "\ufffd" not in text and int(tok[0]) != self.tokenizer.eos_id:
            self.write(text)
            self.pending.clear()

    def rest(self) -> str:
        return self.tokenizer.decode(self.pending)


def check_image_arg(image: str | None) -> None:
    if image and not Path(image).is_file():
        raise UserError(f"--image {image}: " + ("a directory, not an image file" if Path(image).is_dir() else
                                               "no such file"))


def save_results(result: dict, path: Path, records: Path | None = None, ckpt: Path | None = None) -> None:
    """A full disk at the very end: one line (the results were printed above)."""
    try:
        save(result, path, records)
    except OSError as e:
        again = f"; the checkpoint is intact: python lsrm.py eval --ckpt {ckpt} --out FILE" if ckpt else ""
        raise UserError(f"{e.filename or path}: cannot be written ({e.strerror}){again}") from None


# ---------------------------------------------------------------------------------------------
# Commands

def cmd_train(args) -> None:
    cfg = load_config(args.config, args.set)
    rank, world = distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    device = default_device()
    out = Path(args.out or f"runs/{cfg.name}")
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError(f"--stop-after must be >= 1 (optimizer steps before stopping), got {args.stop_after}")
    check_precision(cfg.train.frozen_dtype)
    from_rank0(lambda: check_run_dir(out, args.resume, args.overwrite))   # only rank 0 reads and writes --out
    data = data_fingerprint(cfg)
    if args.resume:
        from_rank0(lambda: check_resumable(out, cfg, data), share=False)
    with hold_run_dir(out, log) if rank == 0 else contextlib.nullcontext():     # the other ranks share it
        train_in(out, args, cfg, data, rank, world, log, device)


def train_in(out: Path, args, cfg: C.Config, data: dict, rank: int, world: int, log, device) -> None:
    """`train`, once its run directory is held: the run (model/pipeline.py), then what it says."""
    t0 = time.time()
    done = run(cfg, out, device, resume=args.resume, stop_after=args.stop_after, evaluation=not args.no_eval,
               bounds=not args.no_bounds, fingerprint=data, log=log)
    summary, result = done["summary"], done["result"]
    if summary["interrupted"]:
        leave_group()
        raise Interrupted(f"interrupted at step {summary['step']}/{summary['total']}: saved {out / 'checkpoint.pt'}; "
                          f"continue with the same command and --resume")
    if summary["step"] < summary["total"]:
        log(f"stopped at step {summary['step']}/{summary['total']}: saved {out / 'checkpoint.pt'}; "
            f"continue with --resume")
    elif result is not None:                       # rank 0, unless --no-eval
        print(report(cfg, result))
        save_results(result, out / "metrics.json", out / "predictions.jsonl", ckpt=out / "checkpoint.pt")
        print(f"wall time {fmt_time(time.time() - t0)}; wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")
    leave_group()                      # the other processes wait for rank 0's evaluation, then all exit together


def cmd_eval(args) -> None:
    if args.out:
        check_out_file(Path(args.out))
    device = default_device()
    cfg, model, tokenizer, ckpt = model_from_checkpoint(args.ckpt, device, args.set)
    examples, dataset = make_dataset(cfg, args.split, tokenizer, args.data)
    result = evaluate(cfg, model, tokenizer, examples, dataset, device, split=args.split, bounds=not args.no_bounds)
    print(report(cfg, result))
    if args.out:
        save_results(result, Path(args.out))


def cmd_generate(args) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_image_arg(args.image)
    device = default_device()
    cfg, model, tokenizer, ckpt = model_from_checkpoint(args.ckpt, device, args.set, log=lambda *a: None)
    prompt = args.prompt.replace("\\n", "\n")
    tokens = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt)], device=device)
    if tokens.shape[1] > cfg.llama.max_seq_len:
        raise UserError(f"--prompt: {tokens.shape[1]} tokens with BOS, more than the decoder reads "
                        f"(llama.max_seq_len={cfg.llama.max_seq_len})")
    image = load_pixels(Path(args.image), cfg.vit.image_size, cfg.train.preprocess)[None].to(device) if args.image else None
    stream = TextStream(tokenizer, lambda text: print(text, end="", flush=True))
    model.generate(tokens, model.visual_memory(1, image), args.max_new_tokens, tokenizer.eos_id, on_token=stream)
    print(stream.rest())


def cmd_stepcheck(args) -> None:
    """One PEFT training step at a full preset's true shape, random frozen weights: time and peak memory."""
    from tools.bench import step_check
    cfg = load_config(args.config, args.set)
    print(json.dumps(step_check(cfg, default_device(), getattr(torch, args.dtype), args.batch, args.tokens)))


def cmd_ablate(args) -> None:
    """Table 5 (the ladder) over seeds, then the δ / λ sweep around the config's values (tools/ablate.py)."""
    from tools.ablate import ablate
    if min(args.seeds, args.sweep_seeds) < 0 or args.seeds + args.sweep_seeds == 0:
        raise UserError(f"--seeds {args.seeds} --sweep-seeds {args.sweep_seeds}: counts of runs, >= 0 and not both 0")
    cfg = load_config(args.config, args.set)
    text = ablate(cfg, Path(args.out), default_device(), args.seeds, args.sweep_seeds, args.deltas, args.decays,
                  log=functools.partial(print, flush=True))
    print(text + f"wrote {Path(args.out) / 'ablation.md'}")


def cmd_visualize(args) -> None:
    """Figures 3 and 5 of the paper for one image: M over the patches per text token; Λ and projector maps."""
    from tools.visualize import visualize
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a directory (the PNGs are written into it)")
    check_writable(out, f"--out {out}")
    check_image_arg(args.image)
    device = default_device()
    cfg, model, tokenizer, ckpt = model_from_checkpoint(args.ckpt, device, args.set, log=lambda *a: None)
    examples = None if args.image else make_dataset(cfg, "test", tokenizer)[0]
    prompt = args.prompt.replace("\\n", "\n") if args.prompt else None
    print("\n".join(visualize(model, tokenizer, Path(args.out), device, args.image, prompt, examples)))


def tiny_only(cfg: C.Config, what: str) -> None:
    if not C.is_tiny_vit(cfg):
        raise UserError(f"config {cfg.name!r}: {what}")


def cmd_probe(args) -> None:
    """Per ViT block: how well a small probe reads identity and position (the paper's §3.1 premise)."""
    from tiny_data.probe import run_probe
    cfg = load_config(args.config, args.set)
    tiny_only(cfg, "the probe runs on the tiny ViT and its toy pictures")
    print(run_probe(cfg, Path(args.out), args.train, args.test, args.steps, args.seed))


def cmd_pretrain(args) -> None:
    """Pretrain the tiny backbones and write the committed files (tiny_data/README.md: the command, checksums)."""
    from tiny_data.pretrain import BACKBONES, FILES, write_backbones
    cfg = load_config(args.config, args.set)
    tiny_only(cfg, "only the tiny ViT and decoder are pretrained here")
    if args.read_from and args.only != ["lm_stepwise.pt"]:
        raise UserError("--read-from teaches stage 7 of the step-wise decoder alone: give --only lm_stepwise.pt")
    torch.set_num_threads(args.threads)          # results depend on the thread count: fix it
    t0 = time.time()
    sums = write_backbones(cfg, make_tokenizer(cfg), Path(args.out) if args.out else BACKBONES, smoke=args.smoke,
                           only=tuple(args.only or FILES), read_from=args.read_from)
    for path, digest in sums.items():
        print(f"sha256 {digest}  {path}")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {fmt_time(time.time() - t0)}")


def cmd_params(args) -> None:
    cfg = load_config(args.config, args.set)
    groups = param_groups(build(cfg, device="meta"))       # meta: no memory, no weights
    trainable = sum(g["trainable"] for g in groups.values())
    total = sum(g["total"] for g in groups.values())
    if args.json:
        print(json.dumps({"config": cfg.name, "trainable": trainable, "total": total, "groups": groups}))
        return
    print(f"{cfg.name}: {trainable / 1e6:.2f}M trainable of {total / 1e6:,.1f}M total "
          f"({trainable:,} / {total:,})")
    for name, g in groups.items():
        print(f"  {name:24s} {g['trainable']:>13,} trainable {g['total']:>15,} total")


def cmd_bench(args) -> None:
    """Speed and memory: MemVP vs LSRM, ours vs transformers, KV cache, selection vs sort (tools/bench.py);
    with --data, the data path on a synthetic COCO-sized set (tools/data_bench.py)."""
    if args.data:
        from tools.data_bench import report as data_report, run_data_bench
        if args.images < 32 or args.workers < 1:
            raise UserError(f"--images {args.images} --workers {args.workers}: at least one batch (32) and one worker")
        result = run_data_bench(args.images, args.workers, old=not args.no_old, log=functools.partial(print, flush=True))
        print(data_report(result))
    else:
        from tools.bench import report as bench_report, run_bench
        configs = ("tiny",) if args.quick else tuple(args.configs.split(","))
        result = run_bench(configs, reps=1 if args.quick else args.reps, threads=args.threads)
        print(bench_report(result))
    out = Path(args.out or ("runs/bench_data.json" if args.data else "runs/bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (tests parse the documents' command lines with it)."""
    ap = argparse.ArgumentParser(prog="lsrm.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    presets = f"one of: {', '.join(C.PRESETS)}"

    def command(name: str, fn, help: str, config: str | None = None, config_help: str = presets, ckpt=False):
        """A subcommand with --set (every one that builds a config), and --config or --ckpt if it reads one."""
        p = sub.add_parser(name, help=help)
        p.set_defaults(fn=fn)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. lsrm.delta=0.2 or train.epochs=5")
        if config:
            p.add_argument("--config", default=config, help=config_help)
        if ckpt:
            p.add_argument("--ckpt", required=True, help="a checkpoint.pt written by train")
        return p

    p = command("train", cmd_train, "fine-tune the adapters, then evaluate (tiny: the committed backbones)",
                config="tiny")
    p.add_argument("--out", help="run directory (default runs/CONFIG)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    p.add_argument("--stop-after", type=int, help="stop (and checkpoint) after this many steps in total")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--no-bounds", action="store_true", help="skip the blind and oracle bounds in that evaluation")

    p = command("eval", cmd_eval, "evaluate a checkpoint", ckpt=True)
    p.add_argument("--data", help="dataset directory (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--no-bounds", action="store_true", help="skip the blind and oracle bounds (the frozen decoder alone)")

    p = command("generate", cmd_generate, "greedy decoding from a checkpoint, streamed", ckpt=True)
    p.add_argument("--image", help="an image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help=r"the prompt text; \n for new lines")
    p.add_argument("--max-new-tokens", type=int, default=64)

    p = command("probe", cmd_probe, "per ViT block: can a probe read identity and position? (paper §3.1)",
                config="tiny", config_help="tiny (the probe uses its ViT and the toy pictures)")
    p.add_argument("--out", default="runs/probe", help="directory for probe.png and probe.json")
    p.add_argument("--train", type=int, default=2000, help="training pictures")
    p.add_argument("--test", type=int, default=500, help="held-out pictures")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps per probe (about converged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pictures and the probes")

    p = command("pretrain", cmd_pretrain, "pretrain the tiny backbones into tiny_data/backbones (committed)",
                config="tiny", config_help="tiny (the only preset with its own backbones)")
    p.add_argument("--out", help="directory for vit.pt, lm.pt and lm_stepwise.pt (default tiny_data/backbones)")
    p.add_argument("--only", nargs="+", choices=["vit.pt", "lm.pt", "lm_stepwise.pt"],
                   help="write only these (lm_stepwise.pt alone: taught from the lm.pt and vit.pt in --out)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (the files depend on it: 2 wrote the committed ones)")
    p.add_argument("--smoke", action="store_true", help="a few steps only: files that load (CI)")
    p.add_argument("--read-from", type=Path, metavar="FILE",
                   help="with --only lm_stepwise.pt: take stages 1-6 from FILE (a step-wise decoder written before "
                        "stage 7) and teach stage 7 alone")

    p = command("params", cmd_params, "count trainable and total parameters (built on the meta device)", config="tiny")
    p.add_argument("--json", action="store_true")

    p = command("step-check", cmd_stepcheck, "one PEFT step at a full preset's true shape, random weights",
                config="llama3.2-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="frozen weights' dtype (trainable ones stay fp32)")

    p = sub.add_parser("bench", help="speed and memory: MemVP vs LSRM, ours vs transformers (tiny and mid); "
                                     "--data: the data path")
    p.set_defaults(fn=cmd_bench)
    p.add_argument("--out", help="write the results as JSON here (default runs/bench.json, runs/bench_data.json)")
    p.add_argument("--quick", action="store_true", help="tiny only, one repetition (a smoke test)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side, after one warm-up")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid, or a preset name")
    p.add_argument("--data", action="store_true", help="the data path instead: DataLoader workers, memory over a pass")
    p.add_argument("--images", type=int, default=20_000, help="--data: synthetic COCO-sized JPEGs to write and read")
    p.add_argument("--workers", type=int, default=2, help="--data: worker processes, timed against 0")
    p.add_argument("--no-old", action="store_true", help="--data: skip the old path (float32 cache: ~600 KB a picture)")

    p = command("ablate", cmd_ablate, "Table 5 (the component ladder) over seeds, and a δ/λ sweep", config="tiny")
    p.add_argument("--seeds", type=int, default=3, help="seeds per ladder row")
    p.add_argument("--sweep-seeds", type=int, default=3, help="seeds per δ/λ sweep point")
    p.add_argument("--deltas", type=float, nargs="*", default=[0.1, 0.5], help="δ values (λ fixed)")
    p.add_argument("--decays", type=float, nargs="*", default=[0.7, 0.95], help="λ (lsrm.decay) values (δ fixed)")
    p.add_argument("--out", default="runs/ablate")

    p = command("visualize", cmd_visualize, "the paper's Figures 3 and 5 for one image, as PNGs", ckpt=True)
    p.add_argument("--image", help="an image file (default: the first test image of the checkpoint's data)")
    p.add_argument("--prompt", help="the prompt (default: that test item's)")
    p.add_argument("--out", default="runs/figures", help="directory for the PNGs")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LsrmError as e:           # ours only (model/errors.py): any other exception is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:                # a second Ctrl-C while training, or one outside it
        print("interrupted: stopped at once (a checkpoint already written is whole: each is written atomically)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

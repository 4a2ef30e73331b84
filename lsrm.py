#!/usr/bin/env python3
"""lsrm: the one command-line entry point.

    python lsrm.py train                                   tiny pretrain (cached) + LSRM fine-tune + test
    python lsrm.py eval --ckpt runs/tiny/checkpoint.pt     the accuracy table (or BLEU/CIDEr for COCO)
    python lsrm.py generate --ckpt ... --image P --prompt "..."   greedy decoding, streamed
    python lsrm.py params --config llama-7b [--json]       trainable / total parameters, by group

Options of the config are set with `--set key=value` (e.g. `--set train.epochs=5 --set lsrm.delta=0.2`);
an unknown key is an error that lists the valid ones. Multi-process: `torchrun --nproc_per_node=K lsrm.py train`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from model import config as C
from model.assemble import (UserError, load_config, make_dataset, make_tokenizer, model_from_checkpoint,
                            model_from_config, resolve)
from model.data import collate, load_image
from model.evaluate import evaluate, generate, report
from model.metrics import seeds_tables
from model.train import default_device, distributed, fmt_time, train
from model.vlm import build, param_groups


class Interrupted(Exception):
    """Ctrl-C: one line saying what was kept; exit status 130 (128 + SIGINT), as shells expect."""


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Before any work: --out must be a directory we may write a run into."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a directory")
    has_run = (out / "checkpoint.pt").exists()
    if resume and not has_run:
        raise UserError(f"--resume: {out} holds no checkpoint.pt to continue")
    if has_run and not resume and not overwrite:
        raise UserError(f"{out} already holds a run (checkpoint.pt): continue it with --resume, choose another "
                        f"--out, or replace it with --overwrite")


def check_out_file(out: Path) -> None:
    """Before any work: a file --out must be writable where it is named."""
    if out.is_dir():
        raise UserError(f"--out {out}: a directory; give a file name (e.g. {out / 'metrics.json'})")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist")


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
    check_run_dir(out, args.resume, args.overwrite)
    t0 = time.time()
    torch.manual_seed(cfg.train.seed)
    tokenizer = make_tokenizer(cfg)
    examples, dataset = make_dataset(cfg, "train", tokenizer, limit=cfg.train.limit, log=log)
    evaluation = None if args.no_eval else make_dataset(cfg, cfg.train.eval_split, tokenizer, log=log)  # checked up front
    log(f"{len(examples)} training items from {resolve(cfg.train.data)}; config {cfg.name}; "
        f"{world} process(es) on {device}")
    model = model_from_config(cfg, device, log)
    groups = param_groups(model)
    log(f"trainable parameters: {sum(g['trainable'] for g in groups.values()):,}")
    summary = train(cfg, model, dataset, lambda items: collate(items, tokenizer.pad_id), out,
                    resume=args.resume, stop_after=args.stop_after, log=log, device=device)
    if summary["interrupted"]:
        raise Interrupted(f"interrupted at step {summary['step']}/{summary['total']}: saved {out / 'checkpoint.pt'}; "
                          f"continue with the same command and --resume")
    if summary["step"] < summary["total"]:
        log(f"stopped at step {summary['step']}/{summary['total']}: saved {out / 'checkpoint.pt'}; "
            f"continue with --resume")
        return
    if rank != 0 or args.no_eval:
        return
    result = evaluate(cfg, model, tokenizer, cfg.train.eval_split, device, log=log, loaded=evaluation,
                      bounds=not args.no_bounds)
    result.update(train_seconds=summary["seconds"], total_seconds=time.time() - t0, final_loss=summary["loss"])
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["records"]))
    print(report(cfg, result))
    print(f"wall time {fmt_time(time.time() - t0)}; wrote {out / 'checkpoint.pt'} and {out / 'metrics.json'}")


def cmd_eval(args) -> None:
    if args.out:
        check_out_file(Path(args.out))
    device = default_device()
    cfg, model, tokenizer, ckpt = model_from_checkpoint(args.ckpt, device, args.set)
    result = evaluate(cfg, model, tokenizer, args.split, device, data=args.data,
                      bounds=not args.no_bounds)
    print(report(cfg, result))
    if args.out:
        Path(args.out).write_text(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))


def cmd_generate(args) -> None:
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    device = default_device()
    cfg, model, tokenizer, ckpt = model_from_checkpoint(args.ckpt, device, args.set, log=lambda *a: None)
    prompt = args.prompt.replace("\\n", "\n")
    tokens = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(prompt)], device=device)
    image = load_image(Path(args.image), cfg.vit.image_size, cfg.train.preprocess)[None].to(device) if args.image else None
    z = model.visual_memory(1, image)
    pending: list[int] = []

    def stream(tok: torch.Tensor):               # print as soon as the bytes form whole characters
        pending.append(int(tok[0]))
        text = tokenizer.decode(pending)
        if "\ufffd" not in text and int(tok[0]) != tokenizer.eos_id:
            print(text, end="", flush=True)
            pending.clear()

    generate(model, tokens, z, args.max_new_tokens, tokenizer.eos_id, on_token=stream)
    print(tokenizer.decode(pending))             # whatever is left (an incomplete character shows as �)


def cmd_stepcheck(args) -> None:
    """One PEFT training step at a full preset's true shape, random frozen weights: time and peak memory."""
    from tools.bench import step_check
    cfg = load_config(args.config, args.set)
    print(json.dumps(step_check(cfg, default_device(), getattr(torch, args.dtype), args.batch, args.tokens)))


def cmd_ablate(args) -> None:
    """Table 5 at tiny scale: each ladder row over several seeds, then a δ / λ sweep (Figure 4) around the
    defaults, its centre included. A run the ladder already made (same config, same seed) is not repeated."""
    cfg = load_config(args.config, args.set)
    device = default_device()
    tokenizer = make_tokenizer(cfg)
    train_data = make_dataset(cfg, "train", tokenizer, limit=cfg.train.limit)
    test_data = make_dataset(cfg, cfg.train.eval_split, tokenizer)
    d, lam = cfg.lsrm.delta, cfg.lsrm.decay
    sweep = [(f"δ={x}, λ={lam}", [f"lsrm.delta={x}"]) for x in sorted({*args.deltas, d})] + \
            [(f"δ={d}, λ={x}", [f"lsrm.decay={x}"]) for x in sorted({*args.lams} - {lam})]
    plan = [("ladder", name, c, s) for name, c in C.ladder(cfg) for s in range(args.seeds)]
    plan += [("sweep", name, C.apply_overrides(cfg, o), s) for name, o in sweep for s in range(args.sweep_seeds)]
    plan = [(part, name, C.apply_overrides(c, [f"train.seed={c.train.seed + s}"]), s) for part, name, c, s in plan]
    key = lambda c: json.dumps({**c.to_dict(), "name": None}, sort_keys=True)
    todo = list(dict.fromkeys(key(c) for _, _, c, _ in plan))         # distinct runs, in order
    done: dict[str, dict] = {}
    t0, spent = time.time(), 0.0
    for part, name, c, seed in plan:
        k = key(c)
        if k not in done:
            torch.manual_seed(c.train.seed)
            model = model_from_config(c, device, log=print)      # the first one may pretrain: not counted in the ETA
            t_run = time.time()
            trainable = sum(g["trainable"] for g in param_groups(model).values())
            train(c, model, train_data[1], lambda items: collate(items, tokenizer.pad_id),
                  Path(args.out) / f"run{len(done)}", log=lambda *a: None, device=device)
            r = evaluate(c, model, tokenizer, c.train.eval_split, device, log=None, loaded=test_data, bounds=False)
            done[k] = {"metrics": r["metrics"], "by_type": r["by_type"], "trainable": trainable}
            spent += time.time() - t_run
            print(f"ablate {len(done)}/{len(todo)} | {name} seed {seed} | Avg {r['metrics']['Avg']:.2f} | "
                  f"ETA {fmt_time(spent / len(done) * (len(todo) - len(done)))}", flush=True)
    rows = {part: {} for part in ("ladder", "sweep")}
    for part, name, c, _ in plan:
        rows[part].setdefault(name, []).append(done[key(c)])
    text = ""
    if rows["ladder"]:
        text += f"## Table 5: the ladder, {args.seeds} seed(s) per row\n\n" + \
            seeds_tables(rows["ladder"], {n: runs[0]["trainable"] for n, runs in rows["ladder"].items()}) + "\n\n"
    if rows["sweep"]:
        text += f"## Figure 4: δ and λ around δ={d}, λ={lam}, {args.sweep_seeds} seed(s) per point\n\n" + \
            seeds_tables(rows["sweep"]) + "\n\n"
    text += (f"Test accuracy (%), mean ± std over seeds 0.. added to train.seed; config {cfg.name}; "
             f"{len(done)} runs, {fmt_time(time.time() - t0)} in all.\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.md").write_text(text)
    (Path(args.out) / "ablation.json").write_text(json.dumps(rows, indent=1))
    print(text + f"wrote {Path(args.out) / 'ablation.md'}")


def cmd_visualize(args) -> None:
    """Figures 3 and 5 of the paper for one image: M over the patches per text token; Λ and projector maps."""
    from tools.visualize import draw_figures, focus_report
    device = default_device()
    cfg, model, tokenizer, ckpt = model_from_checkpoint(args.ckpt, device, args.set, log=lambda *a: None)
    if args.image:
        path, prompt = Path(args.image), (args.prompt or "").replace("\\n", "\n")
    else:                                   # the first test item with an image, and its own question
        examples, _ = make_dataset(cfg, "test", tokenizer)
        ex = next(e for e in examples if e.image is not None)
        path, prompt = ex.image, args.prompt or ex.prompt
    answer, f3, f5 = draw_figures(model, tokenizer, path, prompt, Path(args.out), device)
    print(f"answer: {answer!r}\nwrote {f3}\nwrote {f5}")
    if cfg.train.task == "scienceqa" and not args.image:
        print("\n".join(focus_report(model, tokenizer, examples, device)))


def cmd_probe(args) -> None:
    """Per ViT block: how well a small probe reads identity and position (the paper's §3.1 premise)."""
    from tiny_data import make_tiny_data
    from tiny_data.pretrain import pretrained_vit
    from tiny_data.probe import format_probe, probe_figure, probe_vit
    cfg = load_config(args.config, args.set)
    if cfg.vit != C.get_config("tiny").vit:
        raise UserError(f"config {cfg.name!r}: the probe runs on the tiny ViT and its toy pictures")
    if cfg.train.pretrained:
        state = pretrained_vit(cfg)
    else:                                   # random weights: a smoke test
        torch.manual_seed(cfg.train.seed)
        state = build(cfg).visual.state_dict()
    t0 = time.time()
    result = probe_vit(cfg, state, make_tiny_data, args.train, args.test, args.steps, args.seed, log=lambda *a: None)
    print(format_probe(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe_figure(result).save(out / "probe.png")
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    print(f"{fmt_time(time.time() - t0)}; wrote {out / 'probe.png'} and {out / 'probe.json'}")


def cmd_pretrain(args) -> None:
    """Pretrain the tiny backbones and write the committed files (README: command, torch version, checksums)."""
    from tiny_data.pretrain import BACKBONES, write_backbones
    cfg = load_config(args.config, args.set)
    if cfg.vit != C.get_config("tiny").vit:
        raise UserError(f"config {cfg.name!r}: only the tiny ViT and decoder are pretrained here")
    torch.set_num_threads(args.threads)          # results depend on the thread count: fix it
    t0 = time.time()
    sums = write_backbones(cfg, make_tokenizer(cfg), Path(args.out) if args.out else BACKBONES, smoke=args.smoke)
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
    """Speed and memory: MemVP vs LSRM, ours vs transformers, KV cache, selection vs sort (tools/bench.py)."""
    from tools.bench import format_rows, run_bench
    configs = ("tiny",) if args.quick else tuple(args.configs.split(","))
    result = run_bench(configs, reps=1 if args.quick else args.reps, threads=args.threads)
    m = result["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} thread(s), "
          f"{', '.join(m['devices'])}; median of {result['reps']} interleaved repetition(s)")
    print(format_rows(result["rows"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lsrm.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def with_set(p):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. lsrm.delta=0.2 or train.epochs=5")
        return p

    p = with_set(sub.add_parser("train", help="fine-tune (tiny: pretrain backbones first), then evaluate"))
    p.add_argument("--config", default="tiny", help=f"one of: {', '.join(C.PRESETS)}")
    p.add_argument("--out", help="run directory (default runs/CONFIG)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    p.add_argument("--stop-after", type=int, help="stop (and checkpoint) after this many steps in total")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--no-bounds", action="store_true", help="skip the blind and oracle bounds in that evaluation")
    p.set_defaults(fn=cmd_train)

    p = with_set(sub.add_parser("eval", help="evaluate a checkpoint"))
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", help="dataset directory (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--no-bounds", action="store_true", help="skip the blind and oracle bounds (the frozen decoder alone)")
    p.set_defaults(fn=cmd_eval)

    p = with_set(sub.add_parser("generate", help="greedy decoding from a checkpoint, streamed"))
    p.add_argument("--ckpt", required=True)
    p.add_argument("--image", help="an image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help=r"the prompt text; \n for new lines")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(fn=cmd_generate)

    p = with_set(sub.add_parser("probe", help="per ViT block: can a probe read identity and position? (paper §3.1)"))
    p.add_argument("--config", default="tiny", help="tiny (the probe uses its ViT and the toy pictures)")
    p.add_argument("--out", default="runs/probe", help="directory for probe.png and probe.json")
    p.add_argument("--train", type=int, default=2000, help="training pictures")
    p.add_argument("--test", type=int, default=500, help="held-out pictures")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps per probe (about converged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pictures and the probes")
    p.set_defaults(fn=cmd_probe)

    p = with_set(sub.add_parser("pretrain", help="pretrain the tiny backbones into tiny_data/backbones (committed)"))
    p.add_argument("--config", default="tiny", help="tiny (the only preset with its own backbones)")
    p.add_argument("--out", help="directory for vit.pt and lm.pt (default tiny_data/backbones)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the files depend on it; README: 2)")
    p.add_argument("--smoke", action="store_true", help="a few steps only: files that load (CI)")
    p.set_defaults(fn=cmd_pretrain)

    p = with_set(sub.add_parser("params", help="count trainable and total parameters (built on the meta device)"))
    p.add_argument("--config", default="tiny", help=f"one of: {', '.join(C.PRESETS)}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_params)

    p = with_set(sub.add_parser("step-check", help="one PEFT step at a full preset's true shape, random weights"))
    p.add_argument("--config", default="llama3.2-1b", help=f"one of: {', '.join(C.PRESETS)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="frozen weights' dtype (trainable ones stay fp32)")
    p.set_defaults(fn=cmd_stepcheck)

    p = sub.add_parser("bench", help="speed and memory: MemVP vs LSRM, ours vs transformers (tiny and mid)")
    p.add_argument("--out", default="runs/bench.json", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny only, one repetition (a smoke test)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side, after one warm-up")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--configs", default="tiny,mid", help="comma-separated: tiny, mid, or a preset name")
    p.set_defaults(fn=cmd_bench)

    p = with_set(sub.add_parser("ablate", help="Table 5 (the component ladder) over seeds, and a δ/λ sweep"))
    p.add_argument("--config", default="tiny", help=f"one of: {', '.join(C.PRESETS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per ladder row")
    p.add_argument("--sweep-seeds", type=int, default=3, help="seeds per δ/λ sweep point")
    p.add_argument("--deltas", type=float, nargs="*", default=[0.1, 0.5], help="δ values (λ fixed)")
    p.add_argument("--lams", type=float, nargs="*", default=[0.7, 0.95], help="λ values (δ fixed)")
    p.add_argument("--out", default="runs/ablate")
    p.set_defaults(fn=cmd_ablate)

    p = with_set(sub.add_parser("visualize", help="the paper's Figures 3 and 5 for one image, as PNGs"))
    p.add_argument("--ckpt", required=True)
    p.add_argument("--image", help="an image file (default: the first test image of the checkpoint's data)")
    p.add_argument("--prompt", help="the prompt (default: that test item's)")
    p.add_argument("--out", default="runs/figures", help="directory for the PNGs")
    p.set_defaults(fn=cmd_visualize)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (UserError, ValueError) as e:     # DataError, CheckpointError, WeightsError are ValueErrors
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

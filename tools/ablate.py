"""The paper's Table 5 and its δ/λ study (`python lsrm.py ablate`; tutorial §9, docs/results.md).

The ladder (`ladder` in model/config.py: MemVP, + multilevel fusion, + SRProj, + inheritable
cross-attention) is trained and tested over several seeds, then δ and λ are swept around the config's
values with the others fixed. The sweep's centre is the ladder's last row: a run already made (same
config, same seed) is not made again. Seeds are added to `train.seed`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from model import config as C
from model.assemble import make_dataset, make_tokenizer
from model.metrics import seeds_tables
from model.pipeline import run
from model.train import fmt_time


def plan(cfg: C.Config, seeds: int, sweep_seeds: int, deltas, decays) -> list[tuple[str, str, C.Config, int]]:
    """[(part, row name, config with its seed, seed)] for part 'ladder' then 'sweep', in running order."""
    d, decay = cfg.lsrm.delta, cfg.lsrm.decay
    sweep = [(f"δ={x}, λ={decay}", [f"lsrm.delta={x}"]) for x in sorted({*deltas, d})] + \
            [(f"δ={d}, λ={x}", [f"lsrm.decay={x}"]) for x in sorted({*decays} - {decay})]
    runs = [("ladder", name, c, s) for name, c in C.ladder(cfg) for s in range(seeds)]
    runs += [("sweep", name, C.apply_overrides(cfg, o), s) for name, o in sweep for s in range(sweep_seeds)]
    return [(part, name, C.apply_overrides(c, [f"train.seed={c.train.seed + s}"]), s) for part, name, c, s in runs]


def tables(rows: dict, part: str) -> str:
    """The Markdown tables of one part ("ladder", with each row's trainable parameters, or "sweep") of the
    rows ablation.json holds."""
    trainable = {name: runs[0]["trainable"] for name, runs in rows[part].items()} if part == "ladder" else None
    return seeds_tables(rows[part], trainable)


def ablate(cfg: C.Config, out: Path, device, seeds: int = 3, sweep_seeds: int = 3, deltas=(0.1, 0.5),
           decays=(0.7, 0.95), log=print) -> str:
    """Run the plan; write out/run{i}/ for each distinct run, out/ablation.md and out/ablation.json; return
    the markdown (IMG and each picture type as mean ± std: `metrics.seeds_tables`)."""
    out, t0 = Path(out), time.time()
    runs = plan(cfg, seeds, sweep_seeds, deltas, decays)                 # a bad δ or λ stops here, before any work
    tokenizer = make_tokenizer(cfg)                                    # read once for every run
    train_set = make_dataset(cfg, "train", tokenizer, limit=cfg.train.limit)
    test_set = make_dataset(cfg, cfg.train.eval_split, tokenizer)
    key = lambda c: json.dumps({**c.to_dict(), "name": None}, sort_keys=True)
    todo = list(dict.fromkeys(key(c) for _, _, c, _ in runs))          # distinct runs, in order
    done: dict[str, dict] = {}
    spent = 0.0
    for part, name, c, seed in runs:
        if key(c) in done:
            continue
        one = run(c, out / f"run{len(done)}", device, bounds=False, log=log, quiet=True, tokenizer=tokenizer,
                  train_set=train_set, eval_set=test_set)
        r = one["result"]
        done[key(c)] = {"metrics": r["metrics"], "by_type": r["by_type"], "trainable": one["trainable"]}
        spent += one["seconds"]["train"] + one["seconds"]["evaluate"]     # the first model may pretrain: not counted
        log(f"ablate {len(done)}/{len(todo)} | {name} seed {seed} | Avg {r['metrics']['Avg']:.2f} | "
            f"ETA {fmt_time(spent / len(done) * (len(todo) - len(done)))}")
    rows = {"ladder": {}, "sweep": {}}
    for part, name, c, _ in runs:
        rows[part].setdefault(name, []).append(done[key(c)])
    text = ""
    if rows["ladder"]:
        text += f"## Table 5: the ladder, {seeds} seed(s) per row\n\n" + tables(rows, "ladder") + "\n\n"
    if rows["sweep"]:
        text += (f"## Figure 4: δ and λ around δ={cfg.lsrm.delta}, λ={cfg.lsrm.decay}, {sweep_seeds} seed(s) "
                 f"per point\n\n" + tables(rows, "sweep") + "\n\n")
    text += (f"Test accuracy (%), mean ± std over seeds 0.. added to train.seed; config {cfg.name}; "
             f"{len(done)} runs, {fmt_time(time.time() - t0)} in all.\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    return text

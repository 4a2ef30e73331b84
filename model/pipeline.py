"""One run, start to end: tokenizer -> data -> model -> train -> evaluate.

`python lsrm.py train` makes one (`run`), tools/ablate.py one per ladder row, sweep point and seed, reading
the data once for all of them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .assemble import make_dataset, make_tokenizer, model_from_config
from .config import Config
from .evaluate import evaluate
from .paths import resolve
from .train import distributed, from_rank0, train
from .vlm import param_groups


def run(cfg: Config, out: Path, device: torch.device, *, resume: bool = False, stop_after: Optional[int] = None,
        evaluation: bool = True, bounds: bool = True, fingerprint: Optional[dict] = None,
        log: Callable = print, quiet: bool = False, tokenizer=None, train_set: Optional[tuple] = None,
        eval_set: Optional[tuple] = None) -> dict:
    """Fine-tune cfg's adapters into `out` (checkpoint.pt, log.jsonl) and, once the run is whole, score them on
    cfg.train.eval_split (rank 0 only; `evaluation`, with the blind/oracle `bounds`). `tokenizer`, `train_set`
    and `eval_set` ((examples, dataset) each) are made here unless given. `log` gets what is set up; `quiet`
    silences the steps and the evaluation's progress. `fingerprint` (assemble.data_fingerprint) is recorded in
    the checkpoint and checked on `resume`.

    Returns {"model", "trainable", "summary" (train's), "result" (evaluate's with train_seconds, total_seconds,
    final_loss; None if not evaluated), "seconds" {"model", "train", "evaluate"}}."""
    t0 = time.time()
    rank, world = distributed()
    torch.manual_seed(cfg.train.seed)                  # the adapters' initialisation
    tokenizer = tokenizer or make_tokenizer(cfg)
    examples, dataset = train_set or make_dataset(cfg, "train", tokenizer, limit=cfg.train.limit, log=log)
    if evaluation and eval_set is None:                # checked up front, by rank 0 that uses it
        eval_set = from_rank0(lambda: make_dataset(cfg, cfg.train.eval_split, tokenizer, log=log), share=False)
    log(f"{len(examples)} training items from {resolve(cfg.train.data)}; config {cfg.name}; "
        f"{world} process(es) on {device}")
    model = model_from_config(cfg, device, log)
    trainable = sum(g["trainable"] for g in param_groups(model).values())
    log(f"trainable parameters: {trainable:,}")
    t_model = time.time()
    summary = train(cfg, model, dataset, out, resume=resume, stop_after=stop_after,
                    log=(lambda *a: None) if quiet else log, device=device, data=fingerprint)
    t_train, result = time.time(), None
    if evaluation and rank == 0 and not summary["interrupted"] and summary["step"] == summary["total"]:
        result = evaluate(cfg, model, tokenizer, *eval_set, device, split=cfg.train.eval_split,
                          log=None if quiet else log, bounds=bounds)
        result.update(train_seconds=summary["seconds"], total_seconds=time.time() - t0, final_loss=summary["loss"])
    return {"model": model, "trainable": trainable, "summary": summary, "result": result,
            "seconds": {"model": t_model - t0, "train": t_train - t_model, "evaluate": time.time() - t_train}}

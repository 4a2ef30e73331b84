"""Greedy generation with the KV cache, and evaluation on ScienceQA (accuracy table) and COCO (BLEU/CIDEr).

ScienceQA (method.md §8): the model reads the prompt followed by " The answer is" and decodes greedily;
the first capital letter of the continuation is the answer. Prompts are batched by exact token length,
so no padding enters attention and each batch decodes with one shared position counter.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, Optional

import torch

from .metrics import caption_metrics, parse_answer, scienceqa_metrics
from .vlm import LSRM

ANSWER_PREFIX = " The answer is"


@torch.no_grad()
def generate(model: LSRM, tokens: torch.Tensor, z: torch.Tensor, max_new_tokens: int, eos_id: int,
             inheritable: Optional[bool] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None) -> list[list[int]]:
    """Greedy decoding. tokens (B, T): prompts of equal length; z (B, N, D) their visual memory."""
    B, T = tokens.shape
    logits = model(tokens, z=z, inheritable=inheritable, use_cache=True, last_only=True)   # prefill (B, 1, V)
    out = torch.empty(B, 0, dtype=torch.long, device=tokens.device)
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)                                   # (B,)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        out = torch.cat([out, nxt[:, None]], 1)
        if on_token is not None:
            on_token(nxt)
        done |= nxt == eos_id
        if done.all() or T + i + 1 >= model.cfg.llama.max_seq_len:
            break
        logits = model(nxt[:, None], z=z, inheritable=inheritable, start_pos=T + i, use_cache=True,
                       last_only=True)
    model.llama.reset_cache()
    return [[t for t in row if t != eos_id] for row in out.tolist()]


def _by_length(prompts: list[list[int]], batch: int):
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    for _, idx in sorted(groups.items()):
        for j in range(0, len(idx), batch):
            yield idx[j:j + batch]


@torch.no_grad()
def run_generation(model: LSRM, dataset, tokenizer, prefix: str, max_new_tokens: int, batch: int,
                   device: torch.device, inheritable: Optional[bool] = None,
                   log: Optional[Callable[[str], None]] = None) -> list[str]:
    """Greedy continuations of every item's prompt (+ prefix), in dataset order."""
    model.eval()
    extra = tokenizer.encode(prefix) if prefix else []
    items = [dataset[i] for i in range(len(dataset))]
    prompts = [it["tokens"][:it["n_prompt"]] + extra for it in items]
    outputs: list[str] = [""] * len(items)
    done, t0, last_log = 0, time.time(), time.time()
    for idx in _by_length(prompts, batch):
        tokens = torch.tensor([prompts[i] for i in idx], device=device)
        has_image = torch.tensor([items[i]["has_image"] for i in idx], device=device, dtype=torch.float32)
        if has_image.any():
            images = torch.stack([items[i]["image"] for i in idx]).to(device)
            z = model.encode_images(images, has_image)
        else:
            z = model.memory.empty(len(idx))
        for i, ids in zip(idx, generate(model, tokens, z, max_new_tokens, tokenizer.eos_id, inheritable)):
            outputs[i] = tokenizer.decode(ids)
        done += len(idx)
        if log is not None and (done == len(items) or time.time() - last_log > 5):
            last_log, rate = time.time(), done / max(time.time() - t0, 1e-9)
            log(f"eval {done}/{len(items)} | {rate:.1f} items/s | ETA {(len(items) - done) / rate:.0f}s")
    return outputs


def evaluate_scienceqa(model, dataset, examples, tokenizer, device, batch: int = 64,
                       inheritable: Optional[bool] = None, log=None) -> tuple[dict, list[dict]]:
    outputs = run_generation(model, dataset, tokenizer, ANSWER_PREFIX, 4, batch, device, inheritable, log)
    records = []
    for ex, text in zip(examples, outputs):
        pred = parse_answer(text, len(ex.info["choices"]))
        records.append({"id": ex.id, "output": text, "pred": pred, "answer": ex.info["answer"],
                        "correct": pred == ex.info["answer"], "subject": ex.info["subject"],
                        "grade": ex.info["grade"], "has_hint": ex.info["has_hint"],
                        "has_image": ex.info["has_image"]})
    return scienceqa_metrics(records), records


def evaluate_coco(model, dataset, examples, tokenizer, device, batch: int = 64,
                  inheritable: Optional[bool] = None, max_new_tokens: int = 64, log=None) -> tuple[dict, list[dict]]:
    outputs = run_generation(model, dataset, tokenizer, "", max_new_tokens, batch, device, inheritable, log)
    refs = {ex.id: ex.info["references"] for ex in examples}
    hyps = {ex.id: text.strip() for ex, text in zip(examples, outputs)}
    records = [{"id": ex.id, "output": hyps[ex.id], "references": refs[ex.id]} for ex in examples]
    return caption_metrics(refs, hyps), records

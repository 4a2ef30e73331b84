"""Evaluation on ScienceQA (accuracy table) and COCO (BLEU/CIDEr), by greedy decoding (`LSRM.generate`).

ScienceQA: the model reads the prompt followed by " The answer is" and decodes greedily;
the first capital letter of the continuation is the answer. In the formats that write a lecture or solution
first (train.prompt_format QCM-EA, QCM-LEA), the model continues the prompt itself, each row until EOS, its
answer sentence ("The answer is X.") or the token budget (train.gen_tokens); the letter is read from its
"The answer is X", and its solution (the text before) is compared with the gold one. Prompts are batched by
exact token length, so no padding enters attention and each batch decodes with one shared position counter.

Bounds (`scienceqa_bounds`): what the visual memory adds is read against the same frozen decoder alone
(no memory branch, as before any fine-tuning), given the same prompt without the picture (*blind*) and
given the picture in words as the context (*oracle*, where the data has a "description" per problem).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch

from .checkpoint import write_atomically
from .data import Example, scienceqa_prompt
from .metrics import (MIN_GAP, NUMBER, answer_complete, bounds_table, caption_metrics, format_table, gap_closed,
                      hop_metrics, hop_record, hop_table, solution_steps, step_kinds,
                      generation_metrics, generation_table, parse_answer, parse_generated, scienceqa_metrics,
                      solution_text, type_metrics)
from .vlm import LSRM

ANSWER_PREFIX = " The answer is"


def _by_length(prompts: list[list[int]], batch: int):
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    for _, idx in sorted(groups.items()):
        for j in range(0, len(idx), batch):
            yield idx[j:j + batch]


@torch.no_grad()
def run_generation(model: LSRM, dataset, tokenizer, prefix: str, max_new_tokens: int, batch: int,
                   device: torch.device, log: Optional[Callable[[str], None]] = None,
                   decoder_only: bool = False, stop_text: Optional[Callable[[str], bool]] = None) -> list[str]:
    """Greedy continuations of every item's prompt (+ prefix), in dataset order (decoder_only: the frozen
    decoder alone, no visual memory; stop_text: a row ends once its text so far satisfies it)."""
    stop = None if stop_text is None else (lambda ids: stop_text(tokenizer.decode(ids)))
    model.eval()
    extra = tokenizer.encode(prefix) if prefix else []
    items = [dataset[i] for i in range(len(dataset))]
    prompts = [it["tokens"][:it["n_prompt"]] + extra for it in items]
    outputs: list[str] = [""] * len(items)
    done, t0, last_log = 0, time.time(), time.time()
    for idx in _by_length(prompts, batch):
        tokens = torch.tensor([prompts[i] for i in idx], device=device)
        has_image = torch.tensor([items[i]["has_image"] for i in idx], device=device, dtype=torch.float32)
        images = torch.stack([items[i]["image"] for i in idx]).to(device) if has_image.any() else None
        z = None if decoder_only else model.visual_memory(len(idx), images, has_image)
        for i, ids in zip(idx, model.generate(tokens, z, max_new_tokens, tokenizer.eos_id, stop=stop)):
            outputs[i] = tokenizer.decode(ids)
        done += len(idx)
        if log is not None and (done == len(items) or time.time() - last_log > 5):
            last_log, rate = time.time(), done / max(time.time() - t0, 1e-9)
            log(f"eval {done}/{len(items)} | {rate:.1f} items/s | ETA {(len(items) - done) / rate:.0f}s")
    return outputs


def generation_budget(examples: list[Example], tokenizer, gen_tokens: int, max_seq_len: int) -> int:
    """New tokens at most when the model writes text before its answer: gen_tokens, or (0) the longest target
    among `examples` plus 16, within the decoder's max_seq_len."""
    return gen_tokens or min(max(len(tokenizer.encode(ex.target)) for ex in examples) + 16, max_seq_len)


def evaluate_scienceqa(model, dataset, examples, tokenizer, device, batch: int = 64, log=None,
                       decoder_only: bool = False, prompt_format: str = "QCM-A",
                       gen_tokens: int = 0) -> tuple[dict, list[dict]]:
    """(Table-1 metrics, one record per item). QCM-A: one letter read after " The answer is"; the formats that
    write text first: generation from the prompt (at most `generation_budget` new tokens), the letter read
    from "The answer is X", each record with its generated and gold solution."""
    if prompt_format == "QCM-A":
        outputs = run_generation(model, dataset, tokenizer, ANSWER_PREFIX, 4, batch, device, log, decoder_only)
        parse = parse_answer
    else:
        budget = generation_budget(examples, tokenizer, gen_tokens, model.cfg.llama.max_seq_len)
        outputs = run_generation(model, dataset, tokenizer, "", budget, batch, device, log, decoder_only,
                                 stop_text=answer_complete)
        parse = parse_generated
    records = []
    for ex, text in zip(examples, outputs):
        pred = parse(text, len(ex.info["choices"]))
        record = {"id": ex.id, "output": text, "pred": pred, "answer": ex.info["answer"],
                  "correct": pred == ex.info["answer"], "unparsed": pred is None, "subject": ex.info["subject"],
                  "grade": ex.info["grade"], "has_hint": ex.info["has_hint"],
                  "has_image": ex.info["has_image"], "type": ex.info.get("type", "(none)"),
                  "n_choices": len(ex.info["choices"])}
        if prompt_format != "QCM-A":          # kept per item: later metrics read the solution's sentences
            solution, gold = solution_text(text), solution_text(ex.target)
            record.update(solution=solution, gold_solution=gold, solution_match=solution == gold if gold else None,
                          hops=hop_record(gold, solution, given(ex), pred == ex.info["answer"]) if gold else None)
        records.append(record)
    return scienceqa_metrics(records), records


def given(ex: Example) -> str:
    """What an item's question states (its question and hint): numbers there are not looked up (metrics.step_kinds)."""
    return f"{ex.info.get('question', '')} {ex.info.get('hint', '')}"


def fact_positions(ex: Example, tokenizer) -> list[tuple[int, int]]:
    """Token spans [a, b) within the tokens of ex.target of each number its gold solution looks up (the fact
    steps' new numbers, metrics.step_kinds), each with the space before it."""
    steps = solution_steps(ex.target.split("The answer is", 1)[0])
    seen, spans, at = set(NUMBER.findall(given(ex))), [], 0
    for step, kind in zip(steps, step_kinds(steps, given(ex))):
        at = ex.target.index(step, at)
        for m in NUMBER.finditer(step):
            if kind == "fact" and m.group() not in seen:
                start, end = at + m.start(), at + m.end()
                start -= ex.target[start - 1] == " "
                spans.append((len(tokenizer.encode(ex.target[:start])), len(tokenizer.encode(ex.target[:end]))))
        seen |= set(NUMBER.findall(step))
    return spans


@torch.no_grad()
def fact_probe(model: LSRM, dataset, examples: list[Example], tokenizer, device, batch: int = 64) -> dict:
    """The memory's read of each looked-up fact, teacher-forced: at every number a picture item's gold solution
    looks up, is the model's next token that number, given the gold text before it? With each item's own
    picture, and with the pictures shuffled among the items (each gets another's): {type: (% of items with
    every number right, own / shuffled, % of the numbers right, own / shuffled)}, and "all". What the picture
    adds to a fact, apart from the decoder's guess from the question."""
    model.eval()
    wanted = []                                                    # (dataset index, type, [(pos, token)])
    for i, ex in enumerate(examples):
        if not ex.info["has_image"]:
            continue
        item, target = dataset[i], tokenizer.encode(ex.target)
        start = item["n_prompt"]
        checks = [(start + k, target[k]) for a, b in fact_positions(ex, tokenizer) for k in range(a, b)
                  if start + k < len(item["tokens"]) and item["tokens"][start + k] == target[k]]
        if checks:
            wanted.append((i, ex.info["type"], checks))
    # type -> [items right own, shuffled, items, numbers right own, shuffled, numbers]
    hits: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
    for j in range(0, len(wanted), batch):
        chunk = wanted[j:j + batch]
        b = dataset.collate([dataset[i] for i, _, _ in chunk])
        tokens, images = b["tokens"].to(device), b["images"].to(device)
        for k, imgs in enumerate((images, images.roll(1, 0))):      # own pictures; each item another's
            if k == 1 and len(chunk) < 2:
                continue
            pred = model(tokens, imgs, b["has_image"].to(device)).argmax(-1)          # (B, T)
            for row, (_, kind, checks) in enumerate(chunk):
                right = [int(pred[row, pos - 1]) == tok for pos, tok in checks]
                for key in (kind, "all"):
                    hits[key][k] += all(right)
                    hits[key][3 + k] += sum(right)
        for _, kind, checks in chunk:
            for key in (kind, "all"):
                hits[key][2] += 1
                hits[key][5] += len(checks)
    return {k: (100.0 * r / n, 100.0 * s / n, 100.0 * nr / m, 100.0 * ns / m)
            for k, (r, s, n, nr, ns, m) in hits.items()}


def scienceqa_bounds(model, examples: list[Example], dataset, tokenizer, device, batch: int = 64,
                     prompt_format: str = "QCM-A", gen_tokens: int = 0) -> dict:
    """The frozen decoder alone on the same items: *blind* (the same prompt, no picture) and *oracle* (the
    hint and the picture in words as the context), in the same format, generated and read the same way, each
    prompt made into tokens as `dataset` (the items' own) makes them.
    {"blind": (metrics, records), "oracle": (..) or None, "why_no_oracle": str or None}. The oracle needs
    every picture item to carry a description."""
    text_only = [Example(ex.id, ex.prompt, ex.target, None, ex.info) for ex in examples]    # no image to load
    same = dict(decoder_only=True, prompt_format=prompt_format, gen_tokens=gen_tokens)
    blind = evaluate_scienceqa(model, dataset.like(text_only), text_only, tokenizer, device, batch, **same)
    pictures = [ex for ex in examples if ex.info["has_image"]]
    if not pictures or any(ex.info.get("description") is None for ex in pictures):
        return {"blind": blind, "oracle": None,
                "why_no_oracle": "no oracle bound: the data has no 'description' (the picture in words) "
                                 "for every picture problem" if pictures else "no oracle bound: no picture problems"}
    described = [Example(ex.id, scienceqa_prompt(ex.info["question"], ex.info["choices"],
                                                 " ".join(filter(None, [ex.info["hint"], ex.info["description"]]))),
                         ex.target, None, ex.info) if ex.info["has_image"] else
                 Example(ex.id, ex.prompt, ex.target, None, ex.info) for ex in examples]
    oracle = evaluate_scienceqa(model, dataset.like(described), described, tokenizer, device, batch, **same)
    return {"blind": blind, "oracle": oracle, "why_no_oracle": None}


def evaluate_coco(model, dataset, examples, tokenizer, device, batch: int = 64, log=None,
                  max_new_tokens: int = 64) -> tuple[dict, list[dict]]:
    outputs = run_generation(model, dataset, tokenizer, "", max_new_tokens, batch, device, log)
    refs = {ex.id: ex.info["references"] for ex in examples}
    hyps = {ex.id: text.strip() for ex, text in zip(examples, outputs)}
    records = [{"id": ex.id, "output": hyps[ex.id], "references": refs[ex.id]} for ex in examples]
    return caption_metrics(refs, hyps), records


# ---------------------------------------------------------------------------------------------
# One split of a config's data, with the bounds, and its report

def evaluate(cfg, model: LSRM, tokenizer, examples: list[Example], dataset, device, *, split: str, log=print,
             bounds: bool = True) -> dict:
    """Metrics of the fine-tuned model on `examples` (`dataset`: their tokens and pictures, as
    assemble.make_dataset gives them; `split` names them in the result); for ScienceQA also per question type
    ("by_type"), answers not read and solutions written ("generation") and, with `bounds`, the frozen decoder
    alone without the picture ("blind") and with it in words ("oracle")."""
    if cfg.train.task != "scienceqa":
        metrics, records = evaluate_coco(model, dataset, examples, tokenizer, device, cfg.train.eval_batch, log=log)
        return {"split": split, "n": len(examples), "metrics": metrics, "records": records}
    fmt = cfg.train.prompt_format          # QCM-A reads 4 tokens; the others generate up to a budget
    budget = 0 if fmt == "QCM-A" else generation_budget(examples, tokenizer, cfg.train.gen_tokens, cfg.llama.max_seq_len)
    metrics, records = evaluate_scienceqa(model, dataset, examples, tokenizer, device, cfg.train.eval_batch,
                                          log=log, prompt_format=fmt, gen_tokens=budget)
    result = {"split": split, "n": len(examples), "metrics": metrics, "records": records,
              "generation": {"format": fmt, "gen_tokens": budget or None, "LSRM": generation_metrics(records)}}
    by_type = result["by_type"] = type_metrics(records)
    pictures = [r for r in records if r["has_image"]]
    img = {"acc": metrics["IMG"], "n": len(pictures), "image": True,
           "chance": 100.0 * sum(1 / r["n_choices"] for r in pictures) / len(pictures) if pictures else None}
    result["summary"] = {"IMG": img}
    if bounds:
        b = scienceqa_bounds(model, examples, dataset, tokenizer, device, cfg.train.eval_batch, fmt, budget)
        blind, oracle = b["blind"], b["oracle"]
        result["generation"].update(blind=generation_metrics(blind[1]),
                                    oracle=generation_metrics(oracle[1]) if oracle else None)
        result["bounds"] = {"blind": blind[0], "oracle": oracle[0] if oracle else None}
        result["why_no_oracle"] = b["why_no_oracle"]
        blind_t, oracle_t = type_metrics(blind[1]), type_metrics(oracle[1]) if oracle else {}
        for k, t in by_type.items():                   # the oracle is about pictures: text types have none
            t.update(blind=blind_t[k]["acc"], oracle=oracle_t[k]["acc"] if t["image"] and k in oracle_t else None)
        img.update(blind=blind[0]["IMG"], oracle=oracle[0]["IMG"] if oracle else None)
        result["gap_closed"] = {k: gap_closed(t["acc"], t["blind"], t["oracle"])
                                for k, t in {**by_type, "IMG": img}.items() if t["image"]}
    if fmt != "QCM-A":                     # the solution read step by step, and the memory's read of each fact
        result["hops"] = {name: hop_metrics(rs) for name, rs in
                          (("LSRM", records), ("blind", blind[1] if bounds else None),
                           ("oracle", oracle[1] if bounds and oracle else None)) if rs}
        result["fact_probe"] = fact_probe(model, dataset, examples, tokenizer, device, cfg.train.eval_batch)
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
    gen = result["generation"]
    if gen["format"] != "QCM-A":             # QCM-A's report stays as it was: one letter, no solution
        for name in ("LSRM", "blind", "oracle"):
            if gen.get(name):
                out += (f"\n\n{name}: {gen['format']}, written from the prompt (at most {gen['gen_tokens']} new tokens)\n"
                        + generation_table(gen[name]))
        for name, hops in result.get("hops", {}).items():
            if hops.get("all", {}).get("facts") or hops.get("all", {}).get("derived_n"):
                out += (f"\n\n{name}: the solution step by step" +
                        (" (probe: teacher-forced facts with the own / shuffled pictures)" if name == "LSRM" else "") +
                        "\n" + hop_table(hops, result.get("fact_probe") if name == "LSRM" else None))
        out += ("\nunparsed: no \"The answer is X\" with X an option (counted wrong); with sol.: items with a gold "
                "solution; sol. =: share of those whose generated solution (the text before \"The answer is\", "
                "whitespace collapsed) is the gold one; acc | = / acc | ≠: accuracy where it is / is not")
        if result.get("hops"):
            out += ("\nstep by step: facts: the gold solution's steps that look a number up; names: % of them written "
                    "with the gold words; fact|nm: % of those with the number right too; deriv|f: % of the derived "
                    "steps (a comparison) right where every fact is; text|f: % of the steps with no number (an object a "
                    "read found) right where every fact is; ans|st: % of content answers right where every "
                    "step before is; lett|ans: % of letters right where the content answer is; probe / shuffl.: "
                    "teacher-forced, % of picture items whose looked-up numbers are all the model's next token, with "
                    "their own / another item's picture; num / num sh.: % of the looked-up number tokens, likewise")
    return out


def save(result: dict, path: Path, records: Path | None = None) -> None:
    """The result without its per-item records as JSON to `path`; the records, one JSON line each, to `records`."""
    # atomically: a full disk leaves the old file (or none), never half a JSON file
    summary = json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1)
    write_atomically(Path(path), lambda tmp: tmp.write_text(summary))
    if records is not None:
        lines = "".join(json.dumps(r) + "\n" for r in result["records"])
        write_atomically(Path(records), lambda tmp: tmp.write_text(lines))

"""A second tiny decoder, taught to reason step by step: the frozen decoder for the step-wise format (QCM-EA)
with shuffled choices, as LLaMA writes a solution before its answer.

The direct decoder (pretrain.py, lm.pt) answers in one hop. A tiny frozen decoder cannot learn the
relational hops at once (copy two names, look each one's number up, compare, answer, map the answer to its
letter), but each hop alone is learnable, and the step-wise solution (ScienceQA's `solution` field) spells
them out. This continues the direct decoder's pretraining in seven stages (measured on held-out documents,
choices shuffled; the numbers are from the runs that chose this recipe, experiment scripts):

1. letters: the letter of a named option ("So blue. The answer is C."), several per document, half of
   each batch a random token sequence written twice (loss on the repeat). Without the copies the letter
   hop is never learned (41% after 1,500 steps, chance ~35%); with them the copy loss drops suddenly (an
   induction head forms, ~step 800) and the letter hop follows (99% by step 2,000 at lr 1e-3; at 3e-3 the
   copies were learned but the letters stayed at 58%).
2. steps: documents in the step-wise format, choices shuffled, each picture given in words in the
   solutions' own wording (`make_tiny_data.scene_facts`); a third are letter hops, plus copies and rows of the direct
   decoder's corpus (so it keeps what it knew). The letter after the gold solution: 100%.
3. relations: spatial relations and owners alone (as often each), with the direct corpus, lr held. In
   the mix of stage 2 their last hops were not learned; alone, with the solutions' comparison after the
   question restated ("Is the red shape below the blue circle: is 2 more than 7? no. So no."), the
   direction (less or more) after the restatement is 100% by step 100, and the owner after the yes/no
   ("is Ivy's 6 more than Sam's 5? yes. So Ivy.") went from chance to 100% between steps 300 and 400.
4. look-ups: the look-up-in-words documents (`words_lookup_document`, also tiny_data/lookup.py's) with the
   direct corpus. After stage 2 the memory's read of a named object (the look-up probe's harness) had
   fallen to ~41%; taught last, the look-ups bring it to ~80% (stage order matters: taught before stage 2,
   the gain is lost).
   The look-up that forms keys a named object on one of its two words, colour or shape, and which one is up
   to the draw: the committed decoder finds "the red shape" 65% of the time and "the circle" 37%;
   the same command on a CPU with bf16 instructions wrote one that finds them 41% and 100% of the time
   (`words_lookup_by_name`; the stages' logs print it).
5. all together, briefly, so that stage 4 does not erase stage 2's format: letters 100%, look-up in
   words 100%, the memory's read ~88% (harness).
6. reading a memory (`teach_read`): the decoder trained with a throwaway MemVP memory (the committed ViT's)
   on the toy's in-picture questions in the step-wise format, choices shuffled, the picture given only
   through the memory, the loss weighted on the numbers the solution must read from it; stage 5's mix
   alongside. The memory is then thrown away: fine-tuning starts a fresh one. With 600 steps of this stage,
   a fresh memory learns the look-up probe's read of a named object to 73-78% in its own 600 (two seeds),
   against 43% after stage 5: stages 1-5 teach the decoder to use facts given in words, not facts arriving
   through its FFN. 1,500 steps read about the same in the probe (73%) but better end to end: the
   looked-up numbers of the shuffled toy set 52-69% against 39-48% (two fine-tuning seeds); 3,000 steps
   (committed) 69-76%, and every relational type at 80% or more (IMG 65-66 against 35 blind).
7. the hops read from the question and hint (`teach_text`): stage 5's mix with as many documents again of
   the types whose solutions work on the question's and hint's words (every text type, and the map's
   farthest town: chains of named comparisons, unquoted words, the compass rule then its asked part; each type
   as often), at half stage 6's lr. Taught after the read, to the committed stage-6 decoder, which had
   learned the solutions' earlier wording: 2,000 steps leave the look-up in words at 93% (by full name 95%,
   by colour 60%, by shape 34%) and, end to end, bring money, towns and thermal energy from ~40 to 94-100,
   the map's oracle from 31 to 56, TXT from 60 to 84, Avg from 67.9 to 75.5, with IMG as before (65);
   1,000 steps gave Avg 73.9. The cost: another generator's set (tests/other_world.py) is read less well
   through a memory (IMG 47 over three seeds, against 53 with the stage-6 decoder). (From scratch, stages
   2-6 already see the new wording.)

Deterministic for a given torch build and thread count: every draw is seeded.
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable

import torch
import torch.nn as nn

from model.data import channels_first, image_pixels, scienceqa_prompt, scienceqa_target

from . import corpus as pretrain             # the direct decoder's corpus, rows and loss
from . import make_tiny_data as world

STEPWISE_RECIPE = dict(
    seed=2911,
    letters=dict(steps=2000, lr=1e-3, batch=32, copy_share=0.5),     # at 3e-3 the letters were not learned
    steps=dict(steps=1500, lr=1e-3, own=12, docs=12, copies=8, lookups=0),
    relations=dict(steps=600, lr=1e-3, own=12, docs=12, copies=0, lookups=0),   # lr held (no cosine)
    lookups=dict(steps=1000, lr=1e-3),
    mix=dict(steps=600, lr=1e-3, own=12, docs=12, copies=8, lookups=12),
    letter_share=0.3,          # of stage 2/4 documents: letter hops
    prompt_weight=0.2,         # loss weight on a step-wise document's prompt (its scene is random: unpredictable)
    answer_weight=5.0,         # on each answer letter
)
SMOKE = dict(letters=dict(steps=2, batch=4), steps=dict(steps=2), relations=dict(steps=2), lookups=dict(steps=2),
             mix=dict(steps=2))
STAGES = ("letters", "steps", "relations", "lookups", "mix")


HELD_OUT = 300      # documents of each kind measured after a stage (a recipe's "held_out" if it has one: smoke)


def smoke_recipe() -> dict:
    """STEPWISE_RECIPE with each stage shrunk by SMOKE (CI: files that load, not a decoder that knows anything)."""
    return {**STEPWISE_RECIPE, **{k: {**STEPWISE_RECIPE[k], **v} for k, v in SMOKE.items()}, "held_out": 20}


# Stage 6 (`teach_read`): the decoder trained on in-picture questions read through a throwaway memory
READ_RECIPE = dict(
    seed=0, steps=3000, lr=1e-3, warmup=50,     # the decoder's lr: warmup, then half a cosine
    memory_lr=0.0045,          # the throwaway memory's, held: the fine-tuning lr it was set from (0.036 * 32 / 256)
    pictures=12, own=12, docs=12, lookups=12, copies=8,     # rows per step: picture questions + stage 5's mix
    fact_weight=5.0,           # loss weight on each number the solution states that the question does not
)
READ_SMOKE = dict(steps=2, pictures=2, held_out=20)
# the relations whose comparison's direction comes from the question's relation word (make_tiny_data.ask)
RELATIONAL = (world.q_relation, world.q_owner)

# Stage 7 (`teach_text`): the hops read from the question and hint, stage 5's mix alongside
TEXT_RECIPE = dict(seed=77, steps=2000, lr=5e-4, warmup=50,     # the decoder's lr: warmup, then half a cosine
                   own=12, focus=12, docs=12, lookups=12, copies=8)     # rows per step
TEXT_SMOKE = dict(steps=2, own=2, focus=2, docs=2, lookups=2, copies=2, held_out=20)
# the types stage 7 dwells on (each as often): every text type, and the map's farthest town (a chain, as theirs)
FOCUS = tuple(t.make for t in world.QTYPES if t.make not in world.PICTURE_TYPES) + (world.q_map_farthest,)

# the look-up in words (also tiny_data/lookup.py's): a picture's facts as sentences, then some asked again
AXES = {"x": ("column", "to the left of"), "y": ("row", "above")}


def padded(rows: list[tuple[list[int], list[float]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, weights) rows -> tokens (B, T) right-padded with pad_id, weights (B, T) padded with 0."""
    tokens = torch.full((len(rows), max(len(t) for t, _ in rows)), pad_id, dtype=torch.long)
    weights = torch.zeros(tokens.shape)
    for r, (t, w) in enumerate(rows):
        tokens[r, :len(t)], weights[r, :len(w)] = torch.tensor(t), torch.tensor(w)
    return tokens, weights


def shifted(rows: list[tuple[list[int], list[float]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """padded(rows), the weights shifted to the targets: weights[:, i] is of predicting tokens[:, i + 1]."""
    tokens, weights = padded(rows, pad_id)
    return tokens, weights[:, 1:]


def picture_in_words(rng: random.Random) -> tuple[list[dict], str]:
    """A picture of 2-4 objects of random kinds, and its places as sentences in a random order ("The red circle
    is in column 2, row 5. ...")."""
    objects = world.place(rng, world.random_kinds(rng, rng.randint(2, 4)))
    facts = [f"The {world.name(o)} is in column {world.cell(o, 'x')}, row {world.cell(o, 'y')}." for o in objects]
    rng.shuffle(facts)
    return objects, " ".join(facts)


def words_lookup_document(rng: random.Random, tokenizer) -> tuple[list[int], list[float]]:
    """A picture's facts in words, shuffled, then two of its objects' column or row asked again. -> tokens, and a
    loss weight per token: 1 on the questions, 0.1 on the facts (random, so unpredictable)."""
    objects, facts = picture_in_words(rng)
    tokens = tokenizer.encode(facts, bos=True)
    weights = [0.1] * len(tokens)
    for o in rng.sample(objects, 2):
        axis = rng.choice(list(AXES))
        asked = tokenizer.encode(f" The {world.name(o)} is in {AXES[axis][0]} {world.cell(o, axis)}.", bos=False)
        tokens, weights = tokens + asked, weights + [1.0] * len(asked)
    return tokens, weights


@torch.no_grad()
def words_lookup_accuracy(llama: nn.Module, tokenizer, n: int = 300, seed: int = 123) -> float:
    """% of the asked columns/rows whose digit the decoder predicts (teacher-forced) from the facts in words."""
    rng = random.Random(seed)
    tokens, weights = padded([words_lookup_document(rng, tokenizer) for _ in range(n)], tokenizer.pad_id)
    guess = llama(tokens[:, :-1].to(next(llama.parameters()).device)).argmax(-1).cpu()    # (n, T-1)
    digits = torch.tensor([tokenizer.encode(f" {d}", bos=False)[0] for d in range(1, 9)])
    asked = (weights[:, 1:] == 1.0) & torch.isin(tokens[:, 1:], digits)
    return 100.0 * (guess == tokens[:, 1:])[asked].float().mean().item()


@torch.no_grad()
def words_lookup_by_name(llama: nn.Module, tokenizer, n: int = 300, seed: int = 321) -> dict[str, float]:
    """The look-up in words by how the object is named: n pictures (2-4 objects of random kinds), one object's
    column or row asked by each name that picks it out alone -> % right (teacher-forced digit) for "full name"
    ("The red circle is in row"), "by colour" ("The red shape ...") and "by shape" ("The circle ...")."""
    rng, rows, kinds = random.Random(seed), [], []
    for _ in range(n):
        objects, facts = picture_in_words(rng)
        o, axis = rng.choice(objects), rng.choice(list(AXES))
        names = {"full name": f"The {world.name(o)}"}          # every name make_tiny_data.ref may use
        if sum(p["colour"] == o["colour"] for p in objects) == 1:
            names["by colour"] = f"The {o['colour']} shape"
        if sum(p["shape"] == o["shape"] for p in objects) == 1:
            names["by shape"] = f"The {o['shape']}"
        for kind, named in names.items():
            rows.append((tokenizer.encode(f"{facts} {named} is in {AXES[axis][0]} {world.cell(o, axis)}",
                                          bos=True), []))
            kinds.append(kind)
    right = []
    for at in range(0, len(rows), 100):                                  # 100 rows at a time: (100, T, V) logits
        tokens, _ = padded(rows[at:at + 100], tokenizer.pad_id)
        last = torch.tensor([len(t) - 1 for t, _ in rows[at:at + 100]])   # each row's digit
        guess = llama(tokens.to(next(llama.parameters()).device)).argmax(-1).cpu()       # (100, T)
        right += (guess[torch.arange(len(last)), last - 1] == tokens[torch.arange(len(last)), last]).tolist()
    return {k: 100.0 * sum(r for r, x in zip(right, kinds) if x == k) / kinds.count(k)
            for k in ("full name", "by colour", "by shape")}


def held_out(llama: nn.Module, tok, n: int = HELD_OUT) -> str:
    """What a stage's log ends with: the letter after the gold solution and the look-up in words (by name), on
    n held-out documents of each."""
    names = ", ".join(f"{k} {v:.1f}%" for k, v in words_lookup_by_name(llama, tok, n).items())
    return (f"step-wise decoder: letter after the gold solution {letter_accuracy(llama, tok, n):.1f}%, "
            f"look-up in words {words_lookup_accuracy(llama, tok, n):.1f}% ({names}) (held out)")


def own_corpus(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The direct decoder's corpus (another seed than its pretraining's), packed: rows (R, L + 1), weights (R, L)."""
    recipe = pretrain.LM_RECIPE
    return pretrain.pack_documents(world.text_corpus(recipe["seed"] + 7, 20000), tokenizer, recipe["seq_len"],
                                   recipe["answer_weight"])


def teach_lookup(llama: nn.Module, tokenizer, steps: int, lr: float = 1e-3, batch_size: int = 12, seed: int = 0,
                 log=print, own: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Continue the decoder's pretraining for `steps` AdamW steps, each on `batch_size` rows of its own corpus
    (tiny_data/pretrain.py's, so it keeps what it knew: the answer format) and `batch_size` words_lookup_document
    (weighted next-token loss on both, summed), then freeze it again."""
    rows, row_weights = own if own is not None else own_corpus(tokenizer)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    llama.requires_grad_(True)
    opt = torch.optim.AdamW(llama.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))

    def weighted_loss(tokens, weights):                  # weights[:, i]: of predicting tokens[:, i + 1]
        device = next(llama.parameters()).device
        tokens, weights = tokens.to(device), weights.to(device)
        return pretrain.weighted_next_token_loss(llama(tokens[:, :-1]), tokens[:, 1:], weights)

    for step in range(1, steps + 1):
        own = torch.randint(len(rows), (batch_size,), generator=g)
        tokens, weights = padded([words_lookup_document(rng, tokenizer) for _ in range(batch_size)], tokenizer.pad_id)
        loss = weighted_loss(rows[own], row_weights[own]) + weighted_loss(tokens, weights[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps:
            log(f"decoder step {step}: loss {loss.item():.3f}")
    llama.requires_grad_(False)


def letter_hops_document(rng: world.Rng, hops: int = 3) -> str:
    """A real question's options (shuffled, no context), then "So X. The answer is L." for several of them."""
    q = rng.choice(world.QTYPES).make(rng)
    choices = world.shuffle_choices(rng, q, "letter hops")
    said = " ".join(f"So {c}. The answer is {'ABCDE'[choices.index(c)]}."
                    for c in rng.sample(choices, min(hops, len(choices))))
    return scienceqa_prompt(q.question, choices, "") + " " + said


def stepwise_document(rng: world.Rng, letter_share: float, direct_share: float = 0.15,
                      only: tuple | None = None) -> str:
    """A question in the fine-tuning format, choices shuffled, its picture (if any) in words; the target is
    the step-wise solution then the answer (QCM-EA), a few answer at once (QCM-A); or a letter-hops document.
    `only`: draw the question from these question makers alone, each as often."""
    if rng.random() < letter_share:
        return letter_hops_document(rng)
    picture = rng.random() < 0.45 / (1 - 0.3)         # of the rest: ~64% picture questions (the experiment's mix)
    kinds = [t for t in world.QTYPES if (t.make in world.PICTURE_TYPES) == picture]
    if only:
        kinds = [t for t in world.QTYPES if t.make in only]
        q = rng.choice(kinds).make(rng)
    else:
        q = rng.choices(kinds, weights=[t.weight for t in kinds])[0].make(rng)
    context = " ".join(x for x in (q.hint, world.scene_facts(q.scene, q.kind) if q.scene else "") if x)
    choices = world.shuffle_choices(rng, q, "step-wise")
    fmt = "QCM-A" if rng.random() < direct_share else "QCM-EA"
    return scienceqa_prompt(q.question, choices, context) + scienceqa_target(choices.index(q.answer), fmt,
                                                                             solution=q.solution)


def weighted(doc: str, tok, prompt_weight: float, answer_weight: float,
             response_weight: float = 1.0) -> tuple[list[int], list[float]]:
    """Tokens of a document, and a loss weight per token (of predicting it): prompt_weight up to "Response:",
    response_weight after it, answer_weight on each answer letter (the token after "The answer is")."""
    ids = tok.encode(doc, bos=True, eos=True)
    cut = doc.find("\nResponse:") + len("\nResponse:")
    n = len(tok.encode(doc[:cut], bos=True))
    weights = [prompt_weight] * n + [response_weight] * (len(ids) - n)
    for at in _answer_ends(doc):
        weights[len(tok.encode(doc[:at], bos=True))] = answer_weight
    return ids, weights


def _answer_ends(doc: str) -> list[int]:
    ends, at = [], doc.find("The answer is")
    while at >= 0:
        ends.append(at + len("The answer is"))
        at = doc.find("The answer is", at + 1)
    return ends


def copy_document(rng: random.Random, tok) -> tuple[list[int], list[float]]:
    """A random token sequence written twice, loss on the repeat: the task on which induction heads form."""
    vocab = [i for i in range(tok.vocab_size) if i not in (tok.pad_id, tok.eos_id, tok.bos_id)]
    seq = [rng.choice(vocab) for _ in range(rng.randint(8, 24))]
    return [tok.bos_id] + seq + seq, [0.0] * (len(seq) + 2) + [1.0] * (len(seq) - 1)   # the repeat's first: a guess


@torch.no_grad()
def letter_accuracy(llama: nn.Module, tok, n: int = 300, seed: int = 99991, hops: bool = False) -> float:
    """% of answer letters the decoder predicts (teacher-forced) after the gold solution, choices shuffled,
    on held-out step-wise documents (hops: on letter-hops documents)."""
    rng = world.Rng(seed)
    docs = [weighted(letter_hops_document(rng) if hops else stepwise_document(rng, letter_share=0.0, direct_share=0.0),
                     tok, 0.0, 2.0) for _ in range(n)]
    tokens, weights = padded(docs, tok.pad_id)
    guess = llama(tokens[:, :-1].to(next(llama.parameters()).device)).argmax(-1).cpu()
    letters = weights[:, 1:] == 2.0
    return 100.0 * (guess == tokens[:, 1:])[letters].float().mean().item()


def teach_stepwise(llama: nn.Module, tok, recipe: dict | None = None, log: Callable = print,
                   stages: tuple[str, ...] = STAGES) -> None:
    """Continue the direct decoder's pretraining in STEPWISE_RECIPE's stages (module docstring), in place;
    `stages`: which of them, in this order."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown step-wise stage {unknown[0]!r} (known: {', '.join(STAGES)})")
    r = recipe or STEPWISE_RECIPE
    device = next(llama.parameters()).device
    docs_rng, copy_rng = world.Rng(r["seed"]), random.Random(r["seed"] + 1)
    look_rng, g = random.Random(r["seed"] + 2), torch.Generator().manual_seed(r["seed"])
    rows, row_weights = own_corpus(tok)                 # packed once, for stages 2-5

    def loss_of(tokens, weights):                     # weights[:, i]: of predicting tokens[:, i + 1]
        tokens, weights = tokens.to(device), weights.to(device)
        return pretrain.weighted_next_token_loss(llama(tokens[:, :-1]), tokens[:, 1:], weights)

    def letters_batch(s):                             # stage 1: copies + letter hops, loss on the letters only
        n_copy = int(s["batch"] * s["copy_share"])
        batch = [copy_document(copy_rng, tok) for _ in range(n_copy)]
        batch += [weighted(letter_hops_document(docs_rng), tok, 0.0, 1.0, response_weight=0.0)
                  for _ in range(s["batch"] - n_copy)]
        tokens, weights = padded(batch, tok.pad_id)
        return [(tokens, weights[:, 1:])]

    def mixed_batch(s, only=None):                    # stages 2, 3 and 5: own corpus + documents (+ copies, look-ups)
        own = torch.randint(len(rows), (s["own"],), generator=g)
        letter_share = 0.0 if only else r["letter_share"]
        parts = [(rows[own], row_weights[own], False),
                 (*padded([weighted(stepwise_document(docs_rng, letter_share, only=only), tok, r["prompt_weight"],
                                    r["answer_weight"]) for _ in range(s["docs"])], tok.pad_id), True)]
        if s["lookups"]:
            parts.append((*padded([words_lookup_document(look_rng, tok)
                                   for _ in range(s["lookups"])], tok.pad_id), True))
        if s["copies"]:
            parts.append((*padded([copy_document(copy_rng, tok) for _ in range(s["copies"])], tok.pad_id), True))
        return [(t, w[:, 1:] if shifted else w) for t, w, shifted in parts]

    def run(name, s, batch, schedule):
        opt = torch.optim.AdamW(llama.parameters(), lr=s["lr"], weight_decay=0.0, betas=(0.9, 0.95))
        t0 = time.time()
        for step in range(1, s["steps"] + 1):
            for group in opt.param_groups:
                group["lr"] = s["lr"] * schedule(step, s["steps"])
            loss = sum(loss_of(t, w) for t, w in batch(s))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(llama.parameters(), 1.0)
            opt.step()
            if step % 250 == 0 or step == s["steps"]:
                log(f"step-wise decoder, {name} step {step}/{s['steps']}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")

    def cosine(step, total):                          # 100 steps' warmup, then half a cosine
        return min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / total))

    llama.train()
    for stage in stages:
        llama.requires_grad_(True)
        if stage == "letters":
            run("letters", r["letters"], letters_batch, lambda *_: 1.0)
            log(f"step-wise decoder: letter hops "
                f"{letter_accuracy(llama, tok, r.get('held_out', HELD_OUT), hops=True):.1f}% (held out)")
        elif stage == "steps":
            run("steps", r["steps"], mixed_batch, cosine)
        elif stage == "relations":
            run("relations", r["relations"], lambda s: mixed_batch(s, only=RELATIONAL), lambda *_: 1.0)
        elif stage == "lookups":
            llama.requires_grad_(False)
            teach_lookup(llama, tok, r["lookups"]["steps"], lr=r["lookups"]["lr"], seed=r["seed"], log=log,
                         own=(rows, row_weights))
        else:
            run("all together", r["mix"], mixed_batch, cosine)
    llama.requires_grad_(False)
    llama.eval()
    log(held_out(llama, tok, r.get("held_out", HELD_OUT)))


def picture_document(rng: world.Rng, tok, image_size: int, fact_weight: float,
                     ) -> tuple[list[int], list[float], torch.Tensor]:
    """An in-picture question of the toy in the step-wise format (QCM-EA), choices shuffled, the picture not in
    words -> tokens, a loss weight per token (0 on the prompt, 1 on the response, 5 on the answer letter,
    `fact_weight` on each number in the response that the question and hint do not state: the ones to be
    read from the picture), and the (3, S, S) uint8 picture."""
    types = [t for t in world.QTYPES if t.make in world.PICTURE_TYPES]
    q = rng.choices(types, weights=[t.weight for t in types])[0].make(rng)
    choices = world.shuffle_choices(rng, q, "read")
    doc = scienceqa_prompt(q.question, choices, q.hint or "") + scienceqa_target(choices.index(q.answer), "QCM-EA",
                                                                               solution=q.solution)
    ids, weights = weighted(doc, tok, 0.0, 5.0)
    digits = {tok.encode(f" {d}", bos=False)[0] for d in range(10)}
    stated = set(tok.encode(f"{q.question} {q.hint or ''}", bos=False))
    start = len(tok.encode(doc[:doc.find("\nResponse:") + len("\nResponse:")], bos=True))
    for i in range(start, len(ids)):
        if ids[i] in digits and ids[i] not in stated:
            weights[i] = fact_weight
    picture = world.render(q.scene, world.LAND if q.kind == "map" else world.BACKGROUND)
    return ids, weights, channels_first(image_pixels(picture, image_size))


def teach_read(model: nn.Module, tok, recipe: dict | None = None, log: Callable = print) -> None:
    """Stage 6: train `model`'s decoder (model.llama, taught stages 1-5) together with `model`'s fresh memory
    (its trainable parameters) on picture_document rows, with stage 5's mix on the decoder alone; in place.
    The caller seeds torch before building `model` (the memory's init) and keeps only the decoder."""
    r = recipe or READ_RECIPE
    llama, s = model.llama, r["seed"]
    pic_rng, docs_rng, look_rng, copy_rng = world.Rng(s + 5), world.Rng(s + 6), random.Random(s + 7), random.Random(s + 8)
    g = torch.Generator().manual_seed(s + 5)
    rows, row_weights = own_corpus(tok)
    image_size = model.cfg.vit.image_size
    llama.requires_grad_(True)
    decoder = list(llama.parameters())
    memory = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llama.")]
    opt = torch.optim.AdamW([{"params": decoder, "lr": r["lr"]}, {"params": memory, "lr": r["memory_lr"]}],
                            weight_decay=0.0, betas=(0.9, 0.95))

    def decoder_loss(tokens, weights):                  # weights[:, i]: of predicting tokens[:, i + 1]
        return pretrain.weighted_next_token_loss(llama(tokens[:, :-1]), tokens[:, 1:], weights)

    model.train()
    t0 = time.time()
    for step in range(1, r["steps"] + 1):
        opt.param_groups[0]["lr"] = r["lr"] * min(1.0, step / r["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / r["steps"]))
        pics = [picture_document(pic_rng, tok, image_size, r["fact_weight"]) for _ in range(r["pictures"])]
        tokens, weights = padded([(ids, w) for ids, w, _ in pics], tok.pad_id)
        loss = pretrain.weighted_next_token_loss(model(tokens[:, :-1], torch.stack([p for _, _, p in pics])),
                                                 tokens[:, 1:], weights[:, 1:])
        own = torch.randint(len(rows), (r["own"],), generator=g)
        loss = loss + decoder_loss(rows[own], row_weights[own])
        for batch in ([weighted(stepwise_document(docs_rng, STEPWISE_RECIPE["letter_share"]), tok,
                                STEPWISE_RECIPE["prompt_weight"], STEPWISE_RECIPE["answer_weight"])
                       for _ in range(r["docs"])],
                      [words_lookup_document(look_rng, tok) for _ in range(r["lookups"])],
                      [copy_document(copy_rng, tok) for _ in range(r["copies"])]):
            loss = loss + decoder_loss(*shifted(batch, tok.pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        if step % 100 == 0 or step == r["steps"]:
            log(f"step-wise decoder, reading a memory step {step}/{r['steps']}: loss {loss.item():.3f} "
                f"({time.time() - t0:.0f}s)")
    llama.requires_grad_(False)
    model.eval()
    log(held_out(llama, tok, r.get("held_out", HELD_OUT)))


def teach_text(llama: nn.Module, tok, recipe: dict | None = None, log: Callable = print) -> None:
    """Stage 7: continue the decoder (stages 1-6) on `focus` step-wise documents of the FOCUS types per step,
    with stage 5's mix (its own corpus, `docs` documents of every type, look-ups in words, copies); in place."""
    r = recipe or TEXT_RECIPE
    s = r["seed"]
    docs_rng, focus_rng, look_rng, copy_rng = world.Rng(s), world.Rng(s + 1), random.Random(s + 2), random.Random(s + 3)
    g = torch.Generator().manual_seed(s)
    rows, row_weights = own_corpus(tok)
    device = next(llama.parameters()).device
    llama.requires_grad_(True)
    opt = torch.optim.AdamW(llama.parameters(), lr=r["lr"], weight_decay=0.0, betas=(0.9, 0.95))

    def loss_of(tokens, weights):                       # weights[:, i]: of predicting tokens[:, i + 1]
        tokens, weights = tokens.to(device), weights.to(device)
        return pretrain.weighted_next_token_loss(llama(tokens[:, :-1]), tokens[:, 1:], weights)

    def document(rng, letter_share, only=None):
        return weighted(stepwise_document(rng, letter_share, only=only), tok, STEPWISE_RECIPE["prompt_weight"],
                        STEPWISE_RECIPE["answer_weight"])

    llama.train()
    t0 = time.time()
    for step in range(1, r["steps"] + 1):
        opt.param_groups[0]["lr"] = r["lr"] * min(1.0, step / r["warmup"]) * 0.5 * (1 + math.cos(math.pi * step / r["steps"]))
        own = torch.randint(len(rows), (r["own"],), generator=g)
        loss = loss_of(rows[own], row_weights[own])
        for batch in ([document(focus_rng, 0.0, FOCUS) for _ in range(r["focus"])],
                      [document(docs_rng, STEPWISE_RECIPE["letter_share"]) for _ in range(r["docs"])],
                      [words_lookup_document(look_rng, tok) for _ in range(r["lookups"])],
                      [copy_document(copy_rng, tok) for _ in range(r["copies"])]):
            loss = loss + loss_of(*shifted(batch, tok.pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llama.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == r["steps"]:
            log(f"step-wise decoder, question and hint step {step}/{r['steps']}: loss {loss.item():.3f} "
                f"({time.time() - t0:.0f}s)")
    llama.requires_grad_(False)
    llama.eval()
    log(held_out(llama, tok, r.get("held_out", HELD_OUT)))

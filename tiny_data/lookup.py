"""One hop measured alone: does the visual memory deliver a *named* object's column (or row)?

A relational answer takes hops (copy the names, look each one's place up, compare, answer, letter). The look-up
is the hop that needs the picture, so it is measured here on its own. Each item is a toy picture and a relation
question about two of its shapes, then the start of a step-wise solution that names the first shape and stops
where its column comes: "... Response: The red circle is in column" -> " 3". The adapters are trained as in
`lsrm.py train` (the backbones frozen) with the loss on that one digit only, at the recipe's learning rate held
constant; then held-out items are scored with their own pictures and with the pictures shuffled among them
(what the decoder guesses from the words alone), exactly and within one column.

`--ideal` replaces the ViT and projectors by ideal features: each patch's memory vector Z_j is a learned
embedding of the (colour, shape) of the object covering the patch's centre, 0 on the background. The read
itself (K = Z + P1, V = Z + P2, α = SiLU(u Kᵀ), the frozen decoder) is unchanged. If ideal features do no better
than the ViT's, what limits the look-up is the read (matching the query to the named object's keys and carrying
its place out through the values), not the ViT.

`--wording` sets the solution's words before the digit ({name}: "red circle", {axis}: "column" or "row").

`read_selection` shows where the read looks: per block, the match α = SiLU(u Kᵀ) at the look-up token on the
named object's column, on the other objects' columns and on the empty ones, with the keys' two parts (Z, the
picture, and P1, the same for every picture) side by side.

The query of the read is the decoder's FFN input u at the token before the digit. `query_strength` measures, per
block, how much of u depends on which object is named: the norm of its mean over the items, the spread around it,
and the share of that spread explained by the name. `--teach-decoder STEPS` first continues the frozen decoder's
pretraining for STEPS steps on the look-up in words (a picture's facts as sentences, then two of them asked
again: "The red circle is in column 2, row 5. ... The red circle is in column" -> " 2"), the hop the oracle
needs, half of each step on its own corpus so that it keeps its answer format, before the decoder is frozen
for the adapters' training.

    python -m tiny_data.lookup [--steps 600] [--ideal] [--teach-decoder 0] [--wording "The {name} is in {axis}"]
                               [--ckpt RUN/checkpoint.pt] [--set k=v ...]
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.assemble import load_config, make_tokenizer, model_from_checkpoint, model_from_config
from model.config import Config
from model.data import channels_first, image_pixels, scienceqa_prompt
from model.train import default_device
from tiny_data import make_tiny_data as world
from tiny_data.stepwise import AXES, padded, teach_lookup, words_lookup_accuracy, words_lookup_document

WORDING = "The {name} is in {axis}"


def ideal_labels(objects: list[dict], grid: int) -> torch.Tensor:
    """(grid²,) long: for each patch (row-major), 1 + the index of the (colour, shape) of the object whose box
    holds the patch's centre, or 0 (background). Patches are of the toy picture's IMAGE_SIZE px, as the ViT's are
    after its resize."""
    step = world.IMAGE_SIZE / grid
    kinds = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    labels = torch.zeros(grid * grid, dtype=torch.long)
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) * step, (r + 0.5) * step
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                if x0 <= x <= x1 and y0 <= y <= y1:
                    labels[r * grid + c] = 1 + kinds.index((o["colour"], o["shape"]))
    return labels


def make_items(n: int, seed: int, cfg: Config, tokenizer, wording: str = WORDING, axis: str = "x",
               n_objects: tuple[int, int] = (2, 4)) -> list[dict]:
    """n items: tokens (the prompt and the solution up to the digit), target (the digit's token id), cell (the
    first named object's column/row, 1-8), name (its colour and shape), axis, others (the columns/rows the
    other objects are in, the named one's excluded), image ((3, S, S) uint8), labels (ideal_labels)."""
    rng = random.Random(seed)
    word, relation = AXES[axis]
    grid = cfg.vit.image_size // cfg.vit.patch_size
    items = []
    for _ in range(n):
        objects = world.place(rng, world.random_kinds(rng, rng.randint(*n_objects)))
        a, b = rng.sample(objects, 2) if len(objects) > 1 else (objects[0], objects[0])
        prompt = scienceqa_prompt(f"Is the {world.name(a)} {relation} the {world.name(b)}?", ["yes", "no"])
        text = f"{prompt} {wording.format(name=world.name(a), axis=word)}"
        cell = world.cell(a, axis)
        tokens = tokenizer.encode(text, bos=True)
        target = tokenizer.encode(f"{text} {cell}", bos=True)
        if target[:len(tokens)] != tokens or len(target) != len(tokens) + 1:
            raise ValueError(f"the tokenizer does not make ' {cell}' one token after {text!r}")
        others = sorted({world.cell(o, axis) for o in objects if o is not a} - {cell})
        items.append(dict(tokens=tokens, target=target[-1], cell=cell, name=world.name(a), axis=axis, others=others,
                          labels=ideal_labels(objects, grid),
                          image=channels_first(image_pixels(world.render(objects), cfg.vit.image_size))))
    return items


def batch(items: list[dict], pad_id: int, ideal: bool, device=None) -> tuple[torch.Tensor, ...]:
    """-> tokens (B, T) right-padded, last (B,) the index of each row's last token, targets (B,), pictures
    (B, 3, S, S) uint8, or their ideal labels (B, P); on `device` (default: the CPU)."""
    tokens, _ = padded([(it["tokens"], []) for it in items], pad_id)
    last = torch.tensor([len(it["tokens"]) - 1 for it in items])
    pictures = torch.stack([it["labels" if ideal else "image"] for it in items])
    return tuple(t.to(device) for t in (tokens, last, torch.tensor([it["target"] for it in items]), pictures))


class IdealFeatures(nn.Module):
    """Z (B, N, D) from ideal labels (B, P): a learned embedding per (colour, shape), 0 on the background and in
    the learned prompt slots. Its initial scale, std, is about that of the projected ViT features."""

    def __init__(self, cfg: Config, std: float = 0.1):
        super().__init__()
        self.n_slots = cfg.lsrm.n_slots
        self.embed = nn.Embedding(1 + len(world.COLOURS) * len(world.SHAPES), cfg.llama.dim, padding_idx=0)
        nn.init.normal_(self.embed.weight, std=std)
        with torch.no_grad():
            self.embed.weight[0].zero_()

    def forward(self, batch_size: int, labels: torch.Tensor, has_image=None) -> torch.Tensor:
        z = self.embed(labels)                                             # (B, P, D)
        return F.pad(z, (0, 0, 0, self.n_slots - z.shape[1]))             # (B, N, D)


def use_ideal_features(model: nn.Module, cfg: Config) -> IdealFeatures:
    """Swap model.visual_memory for IdealFeatures (trainable; the ViT and projectors are then unused)."""
    ideal = IdealFeatures(cfg).to(model.memory.p1.device)
    model.ideal = ideal                                  # a submodule: its parameters train with the adapters
    object.__setattr__(model, "visual_memory", ideal)    # this model's Z now comes from it (an instance attribute)
    return ideal


@torch.no_grad()
def score(model: nn.Module, items: list[dict], pad_id: int, ideal: bool, tokenizer) -> dict:
    """% of items whose next token is the right digit (exact) or a digit at most one off (near), with their own
    pictures and with each item given the next item's picture (shuffled)."""
    was = model.training
    model.eval()
    tokens, last, targets, pictures = batch(items, pad_id, ideal, model.memory.p1.device)
    cells = torch.tensor([it["cell"] for it in items])
    result = {}
    for name, pics in (("own", pictures), ("shuffled", pictures.roll(1, 0))):
        rows = torch.arange(len(items), device=last.device)
        guess = model(tokens, pics)[rows, last].argmax(-1).cpu()                        # (B,) token ids
        said = torch.tensor([int(w) if (w := tokenizer.decode([int(g)]).strip()).isdigit() else -99 for g in guess])
        result[name] = 100.0 * (guess == targets.cpu()).float().mean().item()
        result[name + " near"] = 100.0 * ((said - cells).abs() <= 1).float().mean().item()
    model.train(was)
    return result


def look_up_queries(model: nn.Module, tokens: torch.Tensor, last: torch.Tensor, z: torch.Tensor) -> dict:
    """The decoder reading memory z (B, N, D): {block: its FFN input u, the read's query, at each row's `last`
    token (B, D)}."""
    us = {}
    hooks = [block.ffn_norm.register_forward_hook(lambda m, i, o, b=b: us.__setitem__(b, o))
             for b, block in enumerate(model.llama.layers)]
    try:
        model.decode(tokens, z)
    finally:
        for h in hooks:
            h.remove()
    rows = torch.arange(len(tokens), device=last.device)
    return {b: us[b][rows, last] for b in sorted(us)}


def query_strength(model: nn.Module, items: list[dict], pad_id: int, ideal: bool = False) -> list[dict]:
    """Per decoder block: the FFN input u (the memory read's query) at each item's last token, (n, D). -> |mean u|,
    the spread (root mean squared distance to the mean) and the % of its variance explained by which object the
    item names (between-name over total); "name part" is that part's own spread, the root of the between-name
    variance: how far the queries of two named objects lie apart."""
    tokens, last, _, pictures = batch(items, pad_id, ideal, model.memory.p1.device)
    us = look_up_queries(model, tokens, last, model.visual_memory(len(items), pictures))
    named = [it["name"] for it in items]
    rows = []
    for b in sorted(us):
        u = us[b].float().cpu()                                                         # (n, D)
        mean = u.mean(0)
        total = ((u - mean) ** 2).sum(1).mean()
        between = sum(((u[[i for i, m in enumerate(named) if m == k]].mean(0) - mean) ** 2).sum() * named.count(k)
                      for k in set(named)) / len(items)
        rows.append({"block": b, "mean": mean.norm().item(), "spread": total.sqrt().item(),
                     "name share": 100.0 * (between / total).item(), "name part": between.sqrt().item()})
    return rows


@torch.no_grad()
def read_selection(model: nn.Module, items: list[dict], pad_id: int, ideal: bool = False) -> list[dict]:
    """Where the read looks, per decoder block: the match α = SiLU(u Kᵀ) (before M and dropout) at each item's
    look-up token, averaged over the patch slots of the named object's column (row: `axis` "y"), of the other
    objects' columns, and of the columns no object is in. A read that finds the named object gives its
    line another α than the other objects' lines; one that ignores the picture gives them all the same. With
    the parts of the keys K = Z + P1: "z" the mean norm of Z over the patch slots, "z spread" of Z around its
    mean over the patches of a picture (what tells the patches apart), "p1" the mean norm of P1 there."""
    grid = model.cfg.vit.grid
    if grid != world.IMAGE_SIZE // world.CELL:
        raise ValueError(f"the ViT's {grid}x{grid} patches are not the toy pictures' "
                         f"{world.IMAGE_SIZE // world.CELL}x{world.IMAGE_SIZE // world.CELL} cells")
    was = model.training
    model.eval()
    tokens, last, _, pictures = batch(items, pad_id, ideal, model.memory.p1.device)
    try:
        z = model.visual_memory(len(items), pictures)                          # (B, N, D)
        us = look_up_queries(model, tokens, last, z)
    finally:
        model.train(was)
    P = grid * grid
    keys = (z + model.memory.p1)[:, :P]                                       # (B, P, D): the patch slots
    out = []
    for b in sorted(us):
        alpha = F.silu(torch.einsum("bd,bpd->bp", us[b].to(keys.dtype), keys)).cpu()
        alpha = alpha.reshape(len(items), grid, grid)                          # (B, rows, columns)
        parts = {"named": [], "others": [], "empty": []}
        for r, it in enumerate(items):
            lines = alpha[r] if it["axis"] == "y" else alpha[r].T       # (line, patches along it)
            named, others = it["cell"] - 1, [c - 1 for c in it["others"]]
            empty = [c for c in range(grid) if c != named and c not in others]
            parts["named"].append(lines[named].mean().item())
            if others:
                parts["others"].append(lines[others].mean().item())
            if empty:
                parts["empty"].append(lines[empty].mean().item())
        out.append({"block": b, **{k: sum(v) / len(v) if v else float("nan") for k, v in parts.items()}})
    zp = z[:, :P].float()
    norms = {"z": zp.norm(dim=-1).mean().item(), "z spread": (zp - zp.mean(1, keepdim=True)).norm(dim=-1).mean().item(),
             "p1": model.memory.p1[0, :P].float().norm(dim=-1).mean().item()}
    return [dict(r, **norms) for r in out]


def run(cfg: Config | None, steps: int, ideal: bool, wording: str = WORDING, axis: str = "x", n_train: int = 2400,
        n_test: int = 400, n_objects: tuple[int, int] = (2, 4), every: int = 0, seed: int = 0,
        teach_decoder: int = 0, ckpt: str = "", overrides: tuple[str, ...] = (), log=print) -> dict:
    """(With ckpt, start from a run's checkpoint instead of cfg: its config, `overrides` applied as `lsrm.py
    evaluate --set` applies them, and its trained adapters; with teach_decoder, teach the decoder the look-up in
    words first.) Train the adapters (or the ideal
    features and the memory) on the look-up for `steps` steps; score. Returns {"steps", "seconds", "scores":
    [(step, score(...)), ...]} (step 0 is before training), "query" (query_strength before training), "words"
    (the decoder's look-up in words, % before and after teaching), "selection" ([(0, read_selection(...)),
    (steps, ...)]: before and after training)."""
    torch.manual_seed(seed)
    device = default_device()                            # a GPU if there is one
    if ckpt:
        cfg, model, tokenizer, _ = model_from_checkpoint(ckpt, device, list(overrides), log=lambda *a: None)
    else:
        tokenizer = make_tokenizer(cfg)
        model = model_from_config(cfg, device, log=lambda *a: None)
    words = [words_lookup_accuracy(model.llama, tokenizer)]
    if teach_decoder:
        teach_lookup(model.llama, tokenizer, teach_decoder, seed=seed, log=log)
        words.append(words_lookup_accuracy(model.llama, tokenizer))
    if ideal:
        use_ideal_features(model, cfg)
    train_items = make_items(n_train, seed + 1, cfg, tokenizer, wording, axis, n_objects)
    test_items = make_items(n_test, seed + 2, cfg, tokenizer, wording, axis, n_objects)
    params = [p for n, p in model.named_parameters()       # with ideal features the projectors are not used
              if p.requires_grad and not (ideal and n.startswith("memory.projectors"))]
    lr = cfg.train.base_lr * cfg.train.batch_size / 256                   # the recipe's peak rate, held constant
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, pad, t0 = random.Random(seed + 3), tokenizer.pad_id, time.time()
    scores = [(0, score(model, test_items, pad, ideal, tokenizer))]
    query = query_strength(model, test_items, pad, ideal)
    selection = [(0, read_selection(model, test_items, pad, ideal))]
    model.train()
    for step in range(1, steps + 1):
        tokens, last, targets, pictures = batch(rng.sample(train_items, min(cfg.train.batch_size, n_train)), pad,
                                                ideal, device)
        logits = model(tokens, pictures)[torch.arange(len(targets), device=last.device), last]     # (B, V)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == steps or (every and step % every == 0):
            scores.append((step, score(model, test_items, pad, ideal, tokenizer)))
            log(f"step {step}: loss {loss.item():.3f}, " + ", ".join(f"{k} {v:.1f}%" for k, v in scores[-1][1].items()))
    if steps:
        selection.append((steps, read_selection(model, test_items, pad, ideal)))
    return {"steps": steps, "seconds": time.time() - t0, "scores": scores, "query": query, "words": words,
            "selection": selection}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tiny_data.lookup", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=0, help="score every this many steps too")
    p.add_argument("--ideal", action="store_true", help="ideal per-patch (colour, shape) features instead of the ViT")
    p.add_argument("--wording", default=WORDING, help="the solution's words before the digit ({name}, {axis})")
    p.add_argument("--axis", choices=AXES, default="x", help="x: the column, y: the row")
    p.add_argument("--objects", default="2,4", help="fewest,most shapes per picture")
    p.add_argument("--teach-decoder", type=int, default=0, metavar="STEPS",
                   help="first teach the decoder the look-up in words for this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", default="", help="start from a run's checkpoint.pt (its config and adapters; "
                                               "--steps 0 only measures it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a tiny config override")
    args = p.parse_args(argv)
    cfg = None if args.ckpt else load_config("tiny", args.set)
    out = run(cfg, args.steps, args.ideal, args.wording, args.axis, n_objects=tuple(map(int, args.objects.split(","))),
              every=args.every, seed=args.seed, teach_decoder=args.teach_decoder, ckpt=args.ckpt, overrides=args.set)
    print("the decoder's look-up in words: " + " -> ".join(f"{w:.1f}%" for w in out["words"]))
    print("the read's query u at the look-up token, per block: |mean u|, spread, % of the spread's variance the name "
          "explains, the name's part of the spread")
    for q in out["query"]:
        print(f"  block {q['block']}: {q['mean']:.2f}, {q['spread']:.2f}, {q['name share']:.1f}%, {q['name part']:.2f}")
    print("where the read looks at the look-up token, per block: the mean match SiLU(u K^T) on the named object's "
          "line, the other objects' lines and the empty ones; the keys' parts |Z|, Z's spread over a picture, |P1|")
    for step, rows in out["selection"]:
        r0 = rows[0]
        print(f"  step {step}: |Z| {r0['z']:.2f}, spread {r0['z spread']:.2f}, |P1| {r0['p1']:.2f}; " + "; ".join(
            f"block {r['block']} {r['named']:.3f} / {r['others']:.3f} / {r['empty']:.3f}" for r in rows))
    s = out["scores"][-1][1]
    held = "ideal features" if args.ideal else "the ViT"
    print(f"look-up after {out['steps']} steps ({out['seconds']:.0f} s), {held}:"
          f" exact {s['own']:.1f}% (shuffled pictures {s['shuffled']:.1f}%),"
          f" within one {s['own near']:.1f}% ({s['shuffled near']:.1f}%)")


if __name__ == "__main__":
    main()

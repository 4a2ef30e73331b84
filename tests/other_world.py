"""Another ScienceQA-format set, written by a generator of its own (not tiny_data's): for checking that the
fine-tuning and evaluation path depends on no wording or size of tiny_data, and that the tiny model learns
from pictures it has never seen the like of. `python tests/other_world.py DIR [--train N --test N]`.

Its world: white 64-px pictures with two or three shapes of 16 px (tiny_data's are 14-18 px on off-white,
with up to four), and its own questions, in the tiny vocabulary: which of two named shapes is higher / lower /
more to the left / right, whether one named shape is left of or below another, how many shapes of a colour or
kind there are, whether there are fewer of one colour than another, and a text question comparing two
numbers. Every solution is steps (facts, a comparison of two numbers, the content answer), every question's
choices are shuffled, and every answer is balanced.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (200, 30, 30), "green": (30, 150, 50), "blue": (30, 60, 200), "yellow": (220, 180, 0)}
SHAPES = ("circle", "square", "triangle")
SIZE, CELL = 16, 8


def scene(rng: random.Random, n: int, kinds=None) -> list[dict]:
    """n shapes of distinct (colour, shape) at random non-overlapping places, centres at least 12 px apart on
    both axes (so every "higher" or "left of" has one answer and lands in different cells)."""
    while True:
        kinds = kinds or rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
        xs, ys = rng.sample(range(10, 55), n), rng.sample(range(10, 55), n)
        if all(abs(a - b) >= 12 for v in (xs, ys) for i, a in enumerate(v) for b in v[i + 1:]):
            return [dict(colour=c, shape=s, x=x, y=y) for (c, s), x, y in zip(kinds, xs, ys)]
        kinds = None if len(set(kinds)) == len(kinds) and rng.random() < 0.5 else kinds


def draw(objects: list[dict]) -> Image.Image:
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for o in objects:
        box = (o["x"] - SIZE // 2, o["y"] - SIZE // 2, o["x"] + SIZE // 2 - 1, o["y"] + SIZE // 2 - 1)
        if o["shape"] == "circle":
            d.ellipse(box, fill=COLOURS[o["colour"]])
        elif o["shape"] == "square":
            d.rectangle(box, fill=COLOURS[o["colour"]])
        else:
            d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[o["colour"]])
    return img


def at(o: dict, axis: str) -> int:
    return o[axis] // CELL + 1


def nm(o: dict) -> str:
    return f"the {o['colour']} {o['shape']}"


def cmp(a: int, b: int) -> str:
    return f"{a} is {'less' if a < b else 'more'} than {b}."


def q_which(rng, want):
    """Which of two named shapes is higher up / lower down / farther left / farther right?"""
    word, axis, smaller = rng.choice([("higher up", "y", True), ("lower down", "y", False),
                                      ("farther left", "x", True), ("farther right", "x", False)])
    objs = scene(rng, rng.randint(2, 3))
    a, b = objs[:2]                                    # asked in this order; the answer is either one (want)
    winner = a if (at(a, axis) < at(b, axis)) == smaller else b
    if (winner is a) != want:
        a, b = b, a
    line = "column" if axis == "x" else "row"
    sol = (f"{nm(a).capitalize()} is in {line} {at(a, axis)}. {nm(b).capitalize()} is in {line} {at(b, axis)}. "
           f"{cmp(at(a, axis), at(b, axis))} So {nm(winner)}.")
    return f"Which shape is {word}: {nm(a)} or {nm(b)}?", [nm(a), nm(b)], nm(winner), sol, objs, "Which of two"


def q_side(rng, want):
    """Is one named shape left of / below another? (yes or no)"""
    word, axis, sign = rng.choice([("to the left of", "x", -1), ("below", "y", 1)])
    objs = scene(rng, rng.randint(2, 3))
    a, b = objs[:2]
    if ((at(a, axis) - at(b, axis)) * sign > 0) != want:
        a, b = b, a
    line = "column" if axis == "x" else "row"
    sol = (f"{nm(a).capitalize()} is in {line} {at(a, axis)}. {nm(b).capitalize()} is in {line} {at(b, axis)}. "
           f"{cmp(at(a, axis), at(b, axis))} So {'yes' if want else 'no'}.")
    return f"Is {nm(a)} {word} {nm(b)}?", ["yes", "no"], "yes" if want else "no", sol, objs, "Left or below"


def q_how_many(rng, want):
    """How many shapes are red / how many circles?"""
    by_colour = rng.random() < 0.5
    attr = rng.choice(list(COLOURS) if by_colour else list(SHAPES))
    key = 0 if by_colour else 1
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    n = rng.randint(max(2, want), 3)
    kinds = rng.sample([p for p in pairs if p[key] == attr], want) + rng.sample([p for p in pairs if p[key] != attr], n - want)
    what = f"{attr} shapes" if by_colour else attr + "s"
    q = f"How many shapes are {attr}?" if by_colour else f"How many {what} are in the picture?"
    return q, ["0", "1", "2", "3"], str(want), f"The number of {what} is {want}. So {want}.", scene(rng, n, kinds), "How many"


def q_fewer(rng, want):
    """Are there fewer shapes of one colour than of another? (yes or no)"""
    a, b = rng.sample(list(COLOURS), 2)
    na, nb = rng.choice([(x, y) for x in range(3) for y in range(3) if x != y and 1 <= x + y <= 3 and (x < y) == want])
    kinds = rng.sample([(a, s) for s in SHAPES], na) + rng.sample([(b, s) for s in SHAPES], nb)
    if len(kinds) < 2:
        kinds += [(rng.choice([c for c in COLOURS if c not in (a, b)]), rng.choice(SHAPES))]
    sol = (f"The number of {a} shapes is {na}. The number of {b} shapes is {nb}. {cmp(na, nb)} "
           f"So {'yes' if want else 'no'}.")
    return f"Are there fewer {a} shapes than {b} shapes?", ["yes", "no"], "yes" if want else "no", sol, \
        scene(rng, len(kinds), kinds), "Fewer shapes"


NAMES = ["Ann", "Ben", "Mia", "Tom", "Zoe", "Max"]


def q_text(rng, want):
    """A text question: who has more (the hint gives two numbers)."""
    x, y = rng.sample(NAMES, 2)
    a, b = rng.sample(range(1, 10), 2)
    winner = x if (a > b) == want else y
    more = "more" if want else "fewer"
    winner = x if ((a > b) if want else (a < b)) else y
    hint = f"{x} has {a} shells. {y} has {b} shells."
    return f"Who has {more} shells?", [x, y], winner, f"{cmp(a, b)} So {winner}.", None, "Who has more", hint


TYPES = [(q_which, [True, False], 25), (q_side, [True, False], 20), (q_how_many, [0, 1, 2, 3], 20),
         (q_fewer, [True, False], 15), (q_text, [True, False], 20)]


def write(root: Path, n_train: int = 1600, n_test: int = 400, seed: int = 77) -> None:
    """problems.json, pid_splits.json and images/{split}/{pid}/image.png under root."""
    rng = random.Random(seed)
    root = Path(root)
    problems, splits = {}, {"train": [], "test": []}
    decks: dict = {}
    for i, split in enumerate(["train"] * n_train + ["test"] * n_test):
        make, answers, _ = rng.choices(TYPES, weights=[t[2] for t in TYPES])[0]
        deck = decks.setdefault(make.__name__, [])
        if not deck:
            deck += rng.sample(answers, len(answers))
        out = make(rng, deck.pop())
        question, choices, answer, solution, objects, category = out[:6]
        hint = out[6] if len(out) > 6 else ""
        choices = rng.sample(choices, len(choices))
        pid = str(1000 + i)
        problems[pid] = dict(question=question, choices=choices, answer=choices.index(answer), hint=hint,
                             image="image.png" if objects else None, task="closed choice", grade="grade3",
                             subject="natural science", topic="pictures", category=category, skill=category,
                             lecture="", solution=solution, split=split)
        splits[split].append(pid)
        if objects:
            path = root / "images" / split / pid / "image.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw(objects).save(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems, indent=0))
    (root / "pid_splits.json").write_text(json.dumps(splits))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=1600)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--seed", type=int, default=77)
    a = ap.parse_args()
    write(a.out, a.train, a.test, a.seed)

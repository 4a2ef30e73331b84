"""Generate the toy datasets under tiny_data/: `python tiny_data/make_tiny_data.py`.

A stand-in for ScienceQA and COCO-Karpathy small enough to commit and to train on a CPU, written in
exactly their file layouts, so the same readers serve the toy and the real data.

The toy world: 64x64 pictures on a plain light background holding 2-4 non-overlapping shapes, each a
(colour, shape) pair from COLOURS x SHAPES, 14-18 px across so they survive the tiny ViT's resize to
32 px. Image questions ask about *relationships* (left of, nearest to, more than, ...), never just one
object's class, and every answer is balanced: each generator first draws the answer it wants, then
draws scenes until one produces it. Text-only and hint questions (ScienceQA's NO and TXT columns)
cover the three subjects with the same balancing.

Everything is deterministic: fixed seeds, a fixed draw order, JSON keys in insertion order, PNGs
written by Pillow with fixed settings (same Pillow build -> same bytes; other builds may deflate
differently, but decode to the same pixels).

Also importable (`tiny_data/__init__.py`) for the tiny backbones' pretraining:
  draw_scene(rng) -> (image, objects)     unlimited fresh labelled pictures for the ViT
  text_corpus(seed, n) -> list[str]       toy documents in the fine-tuning prompt format for the decoder
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:          # `python tiny_data/make_tiny_data.py` must find `model` (text_corpus)
    sys.path.insert(0, str(ROOT))

SCIENCEQA_SEED, COCO_SEED, WORDS_SEED = 2511, 8238, 1108
SCIENCEQA_SIZES = {"train": 2400, "val": 400, "test": 800}
COCO_SIZES = {"train": 450, "restval": 150, "val": 100, "test": 150}

# ---------------------------------------------------------------------------------------------
# The toy world

IMAGE_SIZE = 64
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)           # shapes pictures
LAND = (205, 230, 190)                 # toy maps: pale green land, north at the top
SIZES = (14, 18)                       # shape size range in px (7-9 px after the resize to 32)
TOWN_SIZES = (11, 13)
SPACING = 3                            # min free pixels between two objects' boxes
GAP = 10                               # min centre gap along an axis for "left of", "above", "farthest"...
NEAR_MARGIN = 6                        # the nearest shape must beat the runner-up by this many px


def place(rng: random.Random, kinds: list[tuple[str, str]], sizes=SIZES) -> list[dict]:
    """Drop the given (colour, shape) objects at random non-overlapping spots (rejection sampling)."""
    while True:
        objects = []
        for colour, shape in kinds:
            s = rng.randint(*sizes)
            for _ in range(50):
                x0, y0 = rng.randint(2, IMAGE_SIZE - 2 - s), rng.randint(2, IMAGE_SIZE - 2 - s)
                box = (x0, y0, x0 + s - 1, y0 + s - 1)
                if all(box[0] > o["box"][2] + SPACING or box[2] < o["box"][0] - SPACING or
                       box[1] > o["box"][3] + SPACING or box[3] < o["box"][1] - SPACING for o in objects):
                    objects.append(dict(colour=colour, shape=shape, x=x0 + s // 2, y=y0 + s // 2, size=s, box=box))
                    break
            else:
                break                  # no room left: start the whole picture again
        else:
            return objects


def random_kinds(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs, so "the red circle" always names exactly one object."""
    return rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)


def render(objects: list[dict], background=BACKGROUND) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(img)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse(o["box"], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(o["box"], fill=fill)
        else:                          # triangle pointing up; its box centre lies inside it
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    return img


def draw_scene(rng: random.Random, kind: str = "shapes") -> tuple[Image.Image, list[dict]]:
    """A fresh labelled picture: (64x64 RGB image, [dict(colour, shape, x, y, size), ...]).

    x, y are the object's centre in pixels (y grows downwards). kind="map" draws a toy map instead:
    2-4 towns as small squares of distinct colours on land.
    """
    if kind == "map":
        objects = place(rng, [(c, "square") for c in rng.sample(list(COLOURS), rng.randint(2, 4))], TOWN_SIZES)
    else:
        objects = place(rng, random_kinds(rng, rng.randint(2, 4)))
    img = render(objects, LAND if kind == "map" else BACKGROUND)
    return img, [{k: o[k] for k in ("colour", "shape", "x", "y", "size")} for o in objects]


# ---------------------------------------------------------------------------------------------
# Words

def plural(shape: str) -> str:
    return shape + "s"


def join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def name(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def ref(rng: random.Random, o: dict, objects: list[dict]) -> str:
    """A phrase naming exactly one object: 'the red circle', or shorter when that is unambiguous."""
    options = [f"the {name(o)}"]
    if sum(p["colour"] == o["colour"] for p in objects) == 1:
        options.append(f"the {o['colour']} shape")
    if sum(p["shape"] == o["shape"] for p in objects) == 1:
        options.append(f"the {o['shape']}")
    return rng.choice(options)


NAMES = ["Ann", "Ben", "Mia", "Tom", "Lily", "Sam", "Zoe", "Max", "Eva", "Leo", "Ivy", "Noah"]
TOWNS = ["Oakdale", "Millbrook", "Ashford", "Riverton", "Pinecrest", "Stonebridge", "Fairview", "Elmwood",
         "Lakeside", "Hillcrest", "Brookfield", "Maplewood"]
GOODS = ["a hat", "a loaf of bread", "a toy car", "a pair of shoes", "a book", "a chair", "a kite", "a cup",
         "a ball", "a pencil", "a bike", "a lamp"]
SERVICES = ["cutting hair", "fixing a bike", "walking a dog", "teaching a class", "washing cars",
            "delivering mail", "cleaning windows", "painting a house", "driving a bus", "looking after children",
            "mowing a lawn", "repairing shoes"]
DICTIONARY = sorted(["apple", "bread", "cherry", "dance", "eagle", "fence", "garden", "honey", "island", "jelly",
                     "kettle", "lemon", "magnet", "nest", "ocean", "pencil", "queen", "river", "saddle", "table",
                     "umbrella", "violin", "wagon", "yarn", "zebra", "anchor", "basket", "candle", "desert",
                     "engine", "feather", "giant", "hammer", "insect", "jacket", "kitten", "ladder", "meadow",
                     "needle", "orbit", "pepper", "rabbit", "salmon", "tunnel", "valley", "window", "button",
                     "circle", "dragon", "forest", "ginger", "harbor", "marble", "number", "planet", "rocket"])
RHYMES = [["cat", "hat", "mat", "bat", "rat"], ["dog", "log", "fog", "frog", "jog"], ["cake", "lake", "make", "bake", "rake"],
          ["sun", "run", "fun", "bun"], ["bell", "well", "shell", "tell"], ["king", "ring", "sing", "wing"],
          ["top", "hop", "mop", "shop"], ["boat", "coat", "goat", "float"], ["pin", "fin", "win", "tin"]]
WORD_KINDS = {"a colour": ["red", "green", "blue", "yellow", "purple", "pink", "brown"],
              "a shape": ["circle", "square", "triangle", "oval", "star"],
              "an animal": ["fox", "dog", "horse", "duck", "goat", "bear", "owl", "mouse"],
              "a fruit": ["apple", "pear", "plum", "grape", "lemon", "peach", "mango"]}
VERBS = ["ran", "hopped", "walked", "swam", "jumped", "raced"]
PLACES = ["tree", "barn", "pond", "hill", "house", "river"]
DIRECTIONS = ["north", "south", "east", "west"]
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


# ---------------------------------------------------------------------------------------------
# Question generators. Each returns a Q whose `answer` is the correct choice text; `choices` is
# shuffled afterwards. `scene`/`kind` are set for picture questions.

@dataclass
class Q:
    question: str
    choices: list[str]
    answer: str
    solution: str
    hint: str = ""
    scene: list[dict] | None = None
    kind: str = "shapes"               # "shapes" or "map" (picture questions only)
    shuffle: bool = False              # list the choices shuffled: their natural order gives the answer away
    keep_order: bool = False           # list the choices as the hint names them (owners, legend towns, numbers)


class Rng(random.Random):
    """random.Random plus `deal`: balanced draws. Each key has a shuffled deck of its options, refilled
    when empty, so every option comes up equally often (balanced answers, not merely random ones)."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.decks: dict[str, list] = {}

    def deal(self, key: str, options):
        if not self.decks.get(key):
            self.decks[key] = self.sample(list(options), len(options))
        return self.decks[key].pop()


def pick(rng: random.Random, answer: str, pool: list[str], k: int) -> list[str]:
    """`answer` plus k-1 distractors from pool (uniform, so the choice set says nothing of the answer)."""
    return [answer] + rng.sample([p for p in pool if p != answer], k - 1)


def until(make: Callable[[], Q | None]) -> Q:
    """Draw until the generator accepts (the scene fits the wanted answer and is unambiguous)."""
    while (q := make()) is None:
        pass
    return q


def first_clearly(objects: list[dict], axis: str, best) -> dict | None:
    """The object with the least (best=min) or greatest (max) coordinate, if it wins by GAP, else None."""
    ranked = sorted(objects, key=lambda o: o[axis], reverse=best is max)
    return ranked[0] if abs(ranked[0][axis] - ranked[1][axis]) >= GAP else None


SIDES = {"to the right of": ("x", 1), "to the left of": ("x", -1), "above": ("y", -1), "below": ("y", 1)}


def only_beyond(objects: list[dict], anchor: dict, side: str) -> dict | None:
    """The one object clearly on `side` of anchor, every other one clearly on the opposite side, else None."""
    axis, sign = SIDES[side]
    offsets = [sign * (o[axis] - anchor[axis]) for o in objects if o is not anchor]
    beyond = [o for o in objects if o is not anchor and sign * (o[axis] - anchor[axis]) >= GAP]
    return beyond[0] if len(beyond) == 1 and not any(-GAP < d < GAP for d in offsets) else None


def nearest_to(objects: list[dict], target: dict) -> list[dict] | None:
    """The other objects nearest first, if the nearest beats the runner-up by NEAR_MARGIN px, else None."""
    others = sorted((o for o in objects if o is not target),
                    key=lambda o: math.dist((o["x"], o["y"]), (target["x"], target["y"])))
    d = [math.dist((o["x"], o["y"]), (target["x"], target["y"])) for o in others]
    return others if len(d) >= 2 and d[1] - d[0] >= NEAR_MARGIN else None


def clear_direction(a: dict, b: dict) -> str | None:
    """The one compass direction of town a from town b, if one is clear: the main offset is long and the
    sideways one at most half of it."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if max(abs(dx), abs(dy)) < GAP + 2 or min(abs(dx), abs(dy)) > max(abs(dx), abs(dy)) / 2:
        return None
    return ("east" if dx > 0 else "west") if abs(dx) > abs(dy) else ("south" if dy > 0 else "north")


# Step-wise solutions (QCM-EA): the facts a question needs, one at a time, then the comparison of two
# explicit numbers, then the content answer ("So yes."). A place is a small number: the 64-px picture is 8
# columns and 8 rows of 8 px (the tiny ViT's patch grid), counted from 1 at the left and at the top; a GAP of
# 10 px always puts two objects in different columns (rows). Solutions draw nothing from the rng.
# A relation's comparison is asked in the question's own direction ("to the right of": "Is 2 more than 5?
# no."), so the content answer copies its yes/no: written "2 is less than 5. So no.", the answer is the
# comparison combined with a relation word far back in the question, a hop the tiny decoder did not learn
# (49% after the gold steps). The direction (less or more) did not come from that far either: 50-57% after
# 1,000 steps on relation documents alone, and a linear probe of the decoder's states where it is written
# reads it at chance. So the comparison follows the question restated ("Is the red shape below the blue
# circle: is 2 more than 7? no."): the restatement is a copy, the direction then a word away (100% in 100
# steps). An owner question names the owners in its comparison ("is Ivy's 6 more than Sam's 5? yes. So
# Ivy."): without them the owner after the yes/no stayed at chance in 700 steps; with them, 100% in 400.
# The least or most of several named numbers is found the same way, one comparison at a time (`chain`): the
# map's farthest town, and the shape closest to an edge, whose shapes are first listed in an order that does
# not give the answer away (palette, then shape). Written as one read of the picture ("The shape closest to
# the left side is the green triangle."), that type was LSRM's weakest and the oracle's (44.64 and 55.36).
# The shape beside another is the shape closest to that edge, found by the same chain in the same words
# (`closest_chain`): read from the named shape's place ("The shape to the right of it is the yellow
# triangle."), 70.83 and 68.75. Tried and not kept: a direction between two towns as two subtractions and a
# comparison ("Column 2 is 4 west of column 6. Row 3 is 1 north of row 4. Is 4 west more than 1 north? yes. So
# west."): the comparison and the copy after it were always right, the subtractions 6 times in 40, directions
# 60.00 as before.
# Words are not quoted in solutions: the word tokenizer spells '"wagon"' in bytes, " wagon" as one word.
CELL = IMAGE_SIZE // 8


def cell(o: dict, axis: str) -> int:
    return o[axis] // CELL + 1


def where(o: dict, axis: str) -> str:
    return f"in column {cell(o, 'x')}" if axis == "x" else f"in row {cell(o, 'y')}"


def ask(a: int, op: str, b: int, owners: tuple[str, str] | None = None, restate: str = "") -> str:
    """A comparison asked and answered: ask(2, "more", 5) -> "Is 2 more than 5? no."; with owners ("Ivy",
    "Sam"): "Is Ivy's 2 more than Sam's 5? no." (the owner to answer is then next to the yes/no: a copy);
    after a question restated, restate="Is the red shape below the blue circle?": "Is the red shape below the
    blue circle: is 2 more than 5? no." (the direction is then next to the relation word)."""
    holds = a < b if op == "less" else a > b
    x, y = (f"{owners[0]}'s {a}", f"{owners[1]}'s {b}") if owners else (a, b)
    asked = f"{x} {op} than {y}? {'yes' if holds else 'no'}."
    return f"{restate.removesuffix('?')}: is {asked}" if restate else f"Is {asked}"


def chain(entries: list[tuple[str, int]], op: str, restate: str) -> tuple[str, str]:
    """Which of several named numbers is the least (op="less") or the most ("more"): each compared with the
    next, the best so far first, both named ([("Ivy", 6), ("Sam", 5), ("Eva", 9)], "more", "Who has more?") ->
    ("Who has more: is Ivy's 6 more than Sam's 5? yes. Is Ivy's 6 more than Eva's 9? no.", "Eva"). Each
    comparison's first name is the one before it if that said yes, else its second: a copy from one step back,
    never a look-up by value (which of the names had 9?), which the tiny decoder did not learn (with the
    solution "9 is the most. So Eva.", the name was right 20-40% of the time where every step before it was)."""
    best, steps = entries[0], []
    for i, nxt in enumerate(entries[1:]):
        steps.append(ask(best[1], op, nxt[1], (best[0], nxt[0]), restate if i == 0 else ""))
        if not (best[1] < nxt[1] if op == "less" else best[1] > nxt[1]):
            best = nxt
    return " ".join(steps), best[0]


RELATION_OPS = {side: "less" if sign < 0 else "more" for side, (axis, sign) in SIDES.items()}   # -1: left, up


def q_relation(rng):
    rel = rng.choice(["to the left of", "to the right of", "above", "below"])
    want = rng.deal("relation", ["yes", "no"])

    def make():
        objects = place(rng, random_kinds(rng, rng.randint(2, 4)))
        a, b = rng.sample(objects, 2)
        axis = "x" if "of" in rel else "y"
        if abs(a[axis] - b[axis]) < GAP:
            return None                # too close to call
        truth = {"to the left of": a["x"] < b["x"], "to the right of": a["x"] > b["x"],
                 "above": a["y"] < b["y"], "below": a["y"] > b["y"]}[rel]
        if truth != (want == "yes"):
            return None
        ra, rb = ref(rng, a, objects), ref(rng, b, objects)
        question = f"Is {ra} {rel} {rb}?"
        return Q(question, ["yes", "no"], want, scene=objects,
                 solution=f"{ra.capitalize()} is {where(a, axis)}. {rb.capitalize()} is {where(b, axis)}. "
                          f"{ask(cell(a, axis), RELATION_OPS[rel], cell(b, axis), restate=question)} So {want}.")
    return until(make)


EDGES = {"top": ("y", min), "bottom": ("y", max), "left side": ("x", min), "right side": ("x", max)}
SIDE_EDGES = {"to the right of": "right side", "to the left of": "left side", "above": "top", "below": "bottom"}


def q_extreme(rng):
    edge = rng.deal("extreme", list(EDGES))
    axis, best = EDGES[edge]
    want = rng.deal("extreme colour", list(COLOURS))

    def make():
        objects = place(rng, random_kinds(rng, rng.randint(2, 4)))
        if (first := first_clearly(objects, axis, best)) is None or first["colour"] != want:
            return None
        question = f"What colour is the shape closest to the {edge} of the picture?"
        return Q(question, list(COLOURS), first["colour"], scene=objects,
                 solution=closest_chain(objects, edge, question) + f" So {first['colour']}.")
    return until(make)


def closest_chain(objects: list[dict], edge: str, question: str) -> str:
    """Which shape is closest to an edge of EDGES, step by step: the shapes listed (palette order, then shape
    order: not by place), each one's column or row, a chain of comparisons, then the winner named ("The blue
    square is closest to the right side.")."""
    axis, best = EDGES[edge]
    listed = sorted(objects, key=canonical)
    facts = " ".join(f"The {name(o)} is {where(o, axis)}." for o in listed)
    steps, found = chain([(f"the {name(o)}", cell(o, axis)) for o in listed], "less" if best is min else "more",
                         question)
    return (f"The shapes are {join_and([f'the {name(o)}' for o in listed])}. {facts} {steps} "
            f"{found.capitalize()} is closest to the {edge}.")


def canonical(o: dict) -> tuple[int, int]:
    """An object's place in a listing that does not depend on where it is: its colour in palette order, then
    its shape."""
    return list(COLOURS).index(o["colour"]), SHAPES.index(o["shape"])


def q_colour_beside(rng):
    side = rng.choice(list(SIDES))
    want = rng.deal("beside", list(COLOURS))

    def make():
        objects = place(rng, random_kinds(rng, rng.randint(2, 4)))
        anchor = rng.choice(objects)
        # exactly one shape on that side, every other one clearly on the opposite side
        if (other := only_beyond(objects, anchor, side)) is None or other["colour"] != want:
            return None
        r = ref(rng, anchor, objects)
        # the one shape on that side, every other one clearly on the opposite side, is the closest to that edge
        question = f"What colour is the shape {side} {r}?"
        return Q(question, list(COLOURS), want, scene=objects,
                 solution=closest_chain(objects, SIDE_EDGES[side], question) + f" So {want}.")
    return until(make)


def q_count(rng):
    by_colour = rng.random() < 0.4
    attr = rng.choice(list(COLOURS) if by_colour else list(SHAPES))
    want = rng.deal("count", [0, 1, 2, 3])
    n = rng.randint(max(2, want), 4)
    key = 0 if by_colour else 1
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    kinds = rng.sample([p for p in pairs if p[key] == attr], want) + \
        rng.sample([p for p in pairs if p[key] != attr], n - want)
    objects = place(rng, kinds)
    what = f"{attr} shapes" if by_colour else plural(attr)
    return Q(f"How many {what} are there?", ["0", "1", "2", "3"], str(want),
             scene=objects, solution=f"The number of {what} is {want}. So {want}.")


def q_compare_count(rng):
    by_colour = rng.random() < 0.5
    a, b = rng.sample(list(COLOURS) if by_colour else list(SHAPES), 2)
    want = rng.deal("compare", ["yes", "no"])
    na, nb = rng.choice([(x, y) for x in range(4) for y in range(4) if x != y and 2 <= x + y <= 4
                         and (x > y) == (want == "yes")])
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    key = 0 if by_colour else 1
    kinds = rng.sample([p for p in pairs if p[key] == a], na) + rng.sample([p for p in pairs if p[key] == b], nb)
    if len(kinds) < 4 and rng.random() < 0.5:      # sometimes a shape that is neither
        kinds += rng.sample([p for p in pairs if p[key] not in (a, b)], 1)
    objects = place(rng, kinds)
    wa, wb = (f"{a} shapes", f"{b} shapes") if by_colour else (plural(a), plural(b))
    return Q(f"Are there more {wa} than {wb}?", ["yes", "no"], want, scene=objects,
             solution=f"The number of {wa} is {na}. The number of {wb} is {nb}. {ask(na, 'more', nb)} So {want}.")


def q_nearest(rng):
    want = rng.deal("nearest", list(COLOURS))

    def make():
        objects = place(rng, random_kinds(rng, rng.randint(3, 4)))
        target = rng.choice(objects)
        if (others := nearest_to(objects, target)) is None or others[0]["colour"] != want:
            return None
        r = ref(rng, target, objects)
        return Q(f"What colour is the shape nearest to {r}?", list(COLOURS), others[0]["colour"], scene=objects,
                 solution=f"{r.capitalize()} is in column {cell(target, 'x')}, row {cell(target, 'y')}. The shape "
                          f"nearest to it is the {name(others[0])}. So {want}.")
    return until(make)


OWNER_RELS = {"higher up in": ("y", min), "lower down in": ("y", max), "farther left in": ("x", min),
              "farther right in": ("x", max)}
OWNER_OPS = {rel: "less" if best is min else "more" for rel, (axis, best) in OWNER_RELS.items()}


def q_owner(rng):
    rel = rng.choice(list(OWNER_RELS))
    axis, best = OWNER_RELS[rel]
    first_wins = rng.deal("owner", [True, False])       # the owner the hint names first is the answer

    def make():
        objects = place(rng, random_kinds(rng, rng.randint(2, 4)))
        a, b = rng.sample(objects, 2)
        if abs(a[axis] - b[axis]) < GAP:
            return None
        p, q = rng.sample(NAMES, 2)
        winner = p if best(a[axis], b[axis]) == a[axis] else q
        if (winner == p) != first_wins:
            return None
        ra, rb = ref(rng, a, objects), ref(rng, b, objects)
        hint, question = f"{p} owns {ra}. {q} owns {rb}.", f"Whose shape is {rel} the picture?"
        return Q(question, [p, q], winner, hint=hint, scene=objects, keep_order=True,
                 solution=f"{p} owns {ra}, {where(a, axis)}. {q} owns {rb}, {where(b, axis)}. "
                          f"{ask(cell(a, axis), OWNER_OPS[rel], cell(b, axis), (p, q), question)} So {winner}.")
    return until(make)


MAP_EDGES = {"north": ("y", min), "south": ("y", max), "west": ("x", min), "east": ("x", max)}


def q_map_farthest(rng):
    direction = rng.deal("farthest", DIRECTIONS)
    axis, best = MAP_EDGES[direction]
    want = rng.deal("farthest colour", list(COLOURS))

    def make():
        towns = place(rng, [(c, "square") for c in COLOURS], TOWN_SIZES)      # one town per colour, listed in
        if (first := first_clearly(towns, axis, best)) is None or first["colour"] != want:   # palette order
            return None
        names = rng.sample(TOWNS, len(towns))
        hint = "Towns: " + ", ".join(f"{n} is {o['colour']}" for n, o in zip(names, towns)) + "."
        answer = names[towns.index(first)]
        facts = " ".join(f"The {o['colour']} town is {where(o, axis)}." for o in towns)
        question = f"Which town is farthest {direction}?"
        steps, town = chain([(f"the {o['colour']} town", cell(o, axis)) for o in towns], "less" if best is min else "more",
                            question)
        return Q(question, names, answer, hint=hint, scene=towns, kind="map", keep_order=True,
                 solution=f"{facts} {steps} {town.capitalize()} is {answer}. So {answer}.")
    return until(make)


def q_map_direction(rng):
    want = rng.deal("direction", DIRECTIONS)

    def make():
        towns = place(rng, [(c, "square") for c in rng.sample(list(COLOURS), rng.randint(2, 4))], TOWN_SIZES)
        a, b = rng.sample(towns, 2)
        if clear_direction(a, b) != want:
            return None
        return Q(f"In which direction is the {a['colour']} town from the {b['colour']} town?",
                 DIRECTIONS, want, scene=towns, kind="map",
                 solution=f"The {a['colour']} town is in column {cell(a, 'x')}, row {cell(a, 'y')}. The {b['colour']} "
                          f"town is in column {cell(b, 'x')}, row {cell(b, 'y')}. So {want}.")
    return until(make)


def q_magnets(rng):
    p1, p2 = rng.deal("magnets", [("north", "north"), ("north", "south"), ("south", "north"), ("south", "south")])
    answer = "repel" if p1 == p2 else "attract"
    hint = f"A {p1} pole is next to a {p2} pole."
    return Q("Will these magnets attract or repel?", ["attract", "repel"], answer, hint=hint,
             solution=f"{p1.capitalize()} and {p2} are {'like' if p1 == p2 else 'opposite'} poles. "
                      f"{'Like' if p1 == p2 else 'Opposite'} poles {answer}. So {answer}.")


THINGS = ["cup of tea", "bowl of soup", "pot of water", "glass of milk", "mug of cocoa"]


def q_thermal(rng):
    thing = rng.choice(THINGS)
    k = rng.randint(2, 3)
    temps = rng.sample(range(10, 95, 10), k)                     # two digits each, tens all different
    labels = [f"{thing.split()[0]} {'ABC'[i]}" for i in range(k)]
    more = rng.deal("thermal", [True, False])
    answer = labels[temps.index(max(temps) if more else min(temps))]
    hint = (f"Same mass. " + " ".join(f"{l.capitalize()} is at {t} C." for l, t in zip(labels, temps)))
    amount = ("more" if more else "less") if k == 2 else ("the most" if more else "the least")
    question = f"Which {thing.split()[0]} has {amount} thermal energy?"
    steps, _ = chain(list(zip(labels, temps)), "more" if more else "less", question)
    return Q(question, labels, answer, hint=hint, keep_order=True,
             solution=f"With the same mass, the {'hotter' if more else 'colder'} object has {'more' if more else 'less'} "
                      f"thermal energy. {steps} So {answer}.")


def q_population(rng):
    k = rng.randint(2, 3)
    towns, people = rng.sample(TOWNS, k), [100 * p for p in rng.sample(range(1, 10), k)]   # 100-900: 3 digits
    most = rng.deal("population", [True, False])
    answer = towns[people.index(max(people) if most else min(people))]
    hint = " ".join(f"{t} has {p} people." for t, p in zip(towns, people))
    amount = ("more" if most else "fewer") if k == 2 else ("the most" if most else "the fewest")
    question = f"Which town has {amount} people?"
    steps, _ = chain(list(zip(towns, people)), "more" if most else "less", question)
    return Q(question, towns, answer, hint=hint, keep_order=True, solution=f"{steps} So {answer}.")


TOYS, HOLDINGS = ["ball", "kite", "doll", "drum", "puzzle", "yo-yo", "train"], ["marbles", "stickers", "shells", "apples"]


def q_trade(rng):
    a, b = rng.sample(range(1, 10), 2)
    more = rng.deal("trade", [True, False])
    if rng.random() < 0.5:
        x, y = rng.sample(TOYS, 2)
        hint = f"At the toy shop, a {x} costs {a} coins and a {y} costs {b} coins."
        answer = f"the {x}" if (a > b) == more else f"the {y}"
        question = f"Which toy costs {'more' if more else 'less'}?"
        steps, _ = chain([(f"the {x}", a), (f"the {y}", b)], "more" if more else "less", question)
        return Q(question, [f"the {x}", f"the {y}"], answer, hint=hint, keep_order=True, solution=f"{steps} So {answer}.")
    x, y = rng.sample(NAMES, 2)
    thing = rng.choice(HOLDINGS)
    hint = f"{x} has {a} {thing} and {y} has {b}."
    answer = x if (a > b) == more else y
    question = f"Who has {'more' if more else 'fewer'} {thing}?"
    steps, _ = chain([(x, a), (y, b)], "more" if more else "less", question)
    return Q(question, [x, y], answer, hint=hint, keep_order=True, solution=f"{steps} So {answer}.")


def q_sentence_word(rng):
    colour, animal = rng.choice(WORD_KINDS["a colour"]), rng.choice(WORD_KINDS["an animal"])
    verb, place_ = rng.choice(VERBS), rng.choice(PLACES)
    role = rng.deal("word role", ["names a colour", "names an animal", "is an action word"])
    answer = {"names a colour": colour, "names an animal": animal, "is an action word": verb}[role]
    choices = [colour, animal, verb] + ([place_] if rng.random() < 0.5 else [])
    return Q(f"Which word in the sentence {role}?", choices, answer,
             hint=f'Read the sentence: "The {colour} {animal} {verb} to the {place_}."',
             solution=f"In the sentence, {answer} {role}. So {answer}.")


SHAPE_FACTS = {"triangle": ["three sides", "three corners"], "square": ["four sides", "four corners", "four equal sides"],
               "circle": ["no corners", "no straight sides"]}


def q_shape_fact(rng):
    shape = rng.deal("shape fact", SHAPES)
    fact = rng.choice(SHAPE_FACTS[shape])
    return Q(f"Which shape has {fact}?", pick(rng, shape, list(SHAPES), rng.randint(2, 3)), shape,
             solution=f"A {shape} has {fact}. So {shape}.")


MIXES = {"green": ("blue", "yellow"), "orange": ("red", "yellow"), "purple": ("red", "blue"), "pink": ("red", "white")}


def q_mixing(rng):
    result = rng.deal("mixing", list(MIXES))
    a, b = rng.sample(MIXES[result], 2)
    return Q(f"What colour do you get when you mix {a} paint and {b} paint?",
             pick(rng, result, list(MIXES), rng.randint(2, 4)), result, solution=f"{a.capitalize()} and {b} make {result}. So {result}.")


def q_good_service(rng):
    answer = rng.deal("good", ["a good", "a service"])
    x = rng.choice(GOODS if answer == "a good" else SERVICES)
    return Q(f"Is {x} a good or a service?", ["a good", "a service"], answer,
             solution=f"A good is a thing you can touch; a service is a job someone does for you. {x.capitalize()} is {answer}. So {answer}.")


def q_compass(rng):
    want = rng.deal("compass", DIRECTIONS)
    if rng.random() < 0.5:
        question = f"Which direction is opposite to {OPPOSITE[want]}?"
        solution = (f"The opposite of north is south, of south north, of east west and of west east. "
                    f"The opposite of {OPPOSITE[want]} is {want}. So {want}.")
    else:
        where = {"north": "up", "south": "down", "east": "to the right", "west": "to the left"}[want]
        question = f"On a map with north at the top, which direction points {where}?"
        solution = (f"On a map, up is north, down is south, to the right is east and to the left is west. "
                    f"{where.capitalize()} is {want}. So {want}.")
    # the rule, then the asked part of it again: the direction is then a copy of the word after it (an
    # induction hop), not recalled in one hop after a sentence about all four (43.75% with the rule alone)
    return Q(question, pick(rng, want, DIRECTIONS, rng.randint(2, 4)), want, solution=solution)


def q_guide_words(rng):
    i = rng.randint(0, len(DICTIONARY) - 3)
    j = rng.randint(i + 2, min(i + 12, len(DICTIONARY) - 1))
    w1, w2 = DICTIONARY[i], DICTIONARY[j]
    answer = rng.choice(DICTIONARY[i + 1:j])
    other = rng.choice(DICTIONARY[:i] + DICTIONARY[j + 1:])
    return Q(f"Which word would you find on a dictionary page with the guide words {w1} - {w2}?", [answer, other], answer,
             solution=f"{answer} comes between {w1} and {w2} in alphabetical order; {other} does not. So {answer}.")


def q_alphabet(rng):
    words = rng.sample(DICTIONARY, rng.randint(2, 3))
    first = rng.deal("alphabet", [True, False])
    answer = min(words) if first else max(words)
    return Q(f"Which word comes {'first' if first else 'last'} in alphabetical order?", words, answer,
             solution=f"Compare the words letter by letter: {answer} comes {'first' if first else 'last'}. So {answer}.",
             shuffle=True)


def q_rhyme(rng):
    g, h = rng.sample(range(len(RHYMES)), 2)
    pair, odd = rng.sample(RHYMES[g], 2), rng.choice(RHYMES[h])
    return Q("Which word does not rhyme?", pair + [odd], odd,
             solution=f"{pair[0]} and {pair[1]} rhyme; {odd} does not. So {odd}.")


def q_word_kind(rng):
    kind, *others = rng.sample(list(WORD_KINDS), rng.randint(3, 4))
    answer = rng.choice(WORD_KINDS[kind])
    return Q(f"Which word names {kind}?", [answer] + [rng.choice(WORD_KINDS[o]) for o in others], answer,
             solution=f"{answer} names {kind}. So {answer}.")


# ---------------------------------------------------------------------------------------------
# The mix: one row per question type. `weight` is its share in percent of every split; IMG types
# total 60, text with a hint (TXT) 18 more, neither (NO) 22. grades: (lowest, highest).

@dataclass
class QType:
    make: Callable[[random.Random], Q]
    weight: int
    subject: str
    topic: str
    category: str
    skill: str
    grades: tuple[int, int]
    lecture: str
    task: str = "closed choice"


NAT, SOC, LAN = "natural science", "social science", "language science"
SPATIAL = "Pictures show where things are. Left and right are as you look at the picture; the top is up."
QTYPES = [
    QType(q_relation, 9, NAT, "spatial-reasoning", "Spatial relations", "Tell if one shape is left of, right of, above or below another", (1, 4), SPATIAL, "yes or no"),
    QType(q_extreme, 7, NAT, "spatial-reasoning", "Extreme positions", "Find the shape closest to an edge", (2, 6), SPATIAL),
    QType(q_colour_beside, 6, NAT, "spatial-reasoning", "Neighbours", "Name the colour of the shape beside another", (3, 8), SPATIAL),
    QType(q_count, 8, NAT, "counting", "Counting shapes", "Count the shapes of one kind", (1, 3), "To count, point at each shape of the kind once."),
    QType(q_compare_count, 7, NAT, "counting", "Comparing numbers of shapes", "Tell if there are more of one kind of shape", (4, 9), "Count both kinds of shape, then compare the two numbers.", "yes or no"),
    QType(q_nearest, 7, NAT, "spatial-reasoning", "Distances", "Find the shape nearest to another", (6, 12), "The nearest shape is the one with the shortest distance between centres."),
    QType(q_owner, 5, NAT, "spatial-reasoning", "Spatial relations with owners", "Use the hint to find each person's shape, then compare positions", (5, 10), SPATIAL),
    QType(q_map_farthest, 6, SOC, "geography", "Cardinal directions on a map", "Use a map legend to find the town farthest in a direction", (4, 9), "On a map, north is at the top, south at the bottom, east on the right and west on the left."),
    QType(q_map_direction, 5, SOC, "geography", "Directions between places", "Tell the direction from one town to another", (6, 12), "On a map, north is at the top, south at the bottom, east on the right and west on the left."),
    QType(q_magnets, 3, NAT, "physics", "Magnets", "Predict if magnets attract or repel", (3, 8), "Opposite poles attract. Like poles repel."),
    QType(q_thermal, 3, NAT, "physics", "Thermal energy", "Compare thermal energy by temperature", (6, 11), "For objects of the same mass and material, the hotter one has more thermal energy."),
    QType(q_population, 3, SOC, "economics", "Comparing towns", "Compare the populations of towns", (3, 7), "The population of a town is the number of people who live there."),
    QType(q_trade, 4, SOC, "economics", "Comparing amounts of money and goods", "Compare prices and amounts", (1, 5), "A price is the number of coins you pay for something."),
    QType(q_sentence_word, 5, LAN, "grammar", "Word roles in a sentence", "Find the word that names a colour, an animal or an action", (2, 6), "Nouns name things, adjectives describe them, and verbs are action words."),
    QType(q_shape_fact, 3, NAT, "geometry", "Shape facts", "Know the sides and corners of shapes", (1, 3), "A triangle has three sides, a square four equal sides, and a circle no corners."),
    QType(q_mixing, 3, NAT, "physics", "Mixing colours", "Know which colour two paints make", (2, 5), "Mixing two paints makes a new colour."),
    QType(q_good_service, 3, SOC, "economics", "Goods and services", "Tell goods from services", (2, 6), "A good is a thing you can touch. A service is a job someone does for you."),
    QType(q_compass, 2, SOC, "geography", "Cardinal directions", "Know the four directions", (3, 7), "The four cardinal directions are north, south, east and west."),
    QType(q_guide_words, 3, LAN, "reference-skills", "Guide words", "Use guide words to find a word in a dictionary", (3, 8), "Guide words are the first and last words on a dictionary page; the words between come between them in alphabetical order."),
    QType(q_alphabet, 3, LAN, "reference-skills", "Alphabetical order", "Put words in alphabetical order", (1, 4), "Alphabetical order compares words letter by letter."),
    QType(q_rhyme, 3, LAN, "phonological-awareness", "Rhyming", "Find the word that does not rhyme", (1, 3), "Rhyming words end with the same sound."),
    QType(q_word_kind, 2, LAN, "vocabulary", "Word categories", "Find the word that names a kind of thing", (1, 3), "Words can be grouped by what they name."),
]
assert sum(t.weight for t in QTYPES) == 100


def type_counts(n: int) -> list[int]:
    """How many items of each type a split of n gets: weight% of n, rounded so they sum to n."""
    exact = [t.weight * n / 100 for t in QTYPES]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(QTYPES)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    return counts


def shuffle_choices(rng: Rng, q: Q, deck: str = "") -> list[str]:
    """Shuffle the choices, the answer's position dealt so that every letter is equally common."""
    others = [c for c in q.choices if c != q.answer]
    rng.shuffle(others)
    others.insert(rng.deal(f"letter of {len(q.choices)} {deck}", range(len(q.choices))), q.answer)
    return others


# Fixed natural order of the choices (instead of shuffling): yes before no, counts ascending, colours
# in the palette order (then the other paint/word colours), shapes as in SHAPES, directions N S E W,
# attract/repel, good/service; an object phrase ("the red circle", "the blue shape", "the square") by
# (colour, shape) in that order; anything else (names, towns, words, "cup A") alphabetically.
CANONICAL = (["yes", "no", "0", "1", "2", "3"] + list(COLOURS) + ["orange", "purple", "pink", "brown", "white"]
             + list(SHAPES) + ["oval", "star"] + DIRECTIONS + ["attract", "repel", "a good", "a service"])


def canonical_key(choice: str):
    if choice in CANONICAL:
        return (0, CANONICAL.index(choice), "")
    words = choice.split()
    if words and words[0] == "the" and (words[-1] in SHAPES or words[-1] == "shape"):
        colour = words[1] if len(words) == 3 else ""
        ranks = (CANONICAL.index(colour) if colour else len(CANONICAL),
                 CANONICAL.index(words[-1]) if words[-1] in SHAPES else len(CANONICAL))
        return (1, ranks, choice)
    return (2, 0, choice.lower())


def canonical_choices(q: Q) -> list[str]:
    """The choices in their fixed natural order: the answer's letter is a function of the choice set."""
    return sorted(q.choices, key=canonical_key)


def order_choices(rng: Rng, q: Q, deck: str = "", shuffle: bool = False) -> list[str]:
    """Choices in the fixed natural order, except where that order would give the answer away (q.shuffle:
    which word comes first/last alphabetically): those are shuffled with balanced letters; and except
    q.keep_order (owners, towns, the things a hint gives numbers for): as the hint lists them.

    Why fixed: reading an arbitrary option list to find the letter of an answer (a content -> letter
    lookup) is a skill a ~1M-parameter decoder does not learn in the minutes of pretraining the tiny path
    allows (measured: at chance after 600 steps of only that); with a fixed order the letter follows from
    the answer. `shuffle` shuffles every question's choices (balanced letters), as the real ScienceQA lists them."""
    if q.shuffle or shuffle:
        return shuffle_choices(rng, q, deck)
    if q.keep_order:
        return list(q.choices)
    return canonical_choices(q)


def caption(q: Q, rng: random.Random) -> str:
    """A coarse caption (objects, no positions) like ScienceQA's machine captions."""
    objects = rng.sample(q.scene, len(q.scene))
    if q.kind == "map":
        return "A map with " + join_and([f"a {o['colour']}" for o in objects]) + " town."
    return "A picture of " + join_and([f"a {name(o)}" for o in objects]) + "."


# ---------------------------------------------------------------------------------------------
# ScienceQA layout

def make_scienceqa(out: Path, sizes: dict[str, int] = SCIENCEQA_SIZES, seed: int = SCIENCEQA_SEED,
                   shuffle: bool = False, facts: bool = False) -> None:
    """The toy ScienceQA under `out`; `shuffle` lists every question's choices shuffled (see order_choices);
    `facts` gives the oracle the picture in the step-wise solutions' wording (scene_facts), not scene_in_words."""
    describe = scene_facts if facts else scene_in_words
    rng = Rng(seed)
    # pids 1..N interleave the splits, as in the real problems.json
    order = [s for s in sizes for _ in range(sizes[s])]
    rng.shuffle(order)
    plan = {}
    for split, n in sizes.items():
        types = [t for t, c in zip(QTYPES, type_counts(n)) for _ in range(c)]
        rng.shuffle(types)
        plan[split] = iter(types)
    problems, splits, captions = {}, {s: [] for s in sizes}, {}
    for i, split in enumerate(order, start=1):
        pid, t = str(i), next(plan[split])
        q = t.make(rng)
        choices = order_choices(rng, q, deck=split, shuffle=shuffle)
        problems[pid] = dict(question=q.question, choices=choices, answer=choices.index(q.answer), hint=q.hint,
                             image="image.png" if q.scene else None, task=t.task,
                             grade=f"grade{rng.randint(*t.grades)}", subject=t.subject, topic=t.topic,
                             category=t.category, skill=t.skill, lecture=t.lecture, solution=q.solution, split=split,
                             description=describe(q.scene, q.kind) if q.scene else None)   # the oracle's context
        splits[split].append(pid)
        if q.scene:
            write_png(render(q.scene, LAND if q.kind == "map" else BACKGROUND), out / "images" / split / pid / "image.png")
            captions[pid] = caption(q, rng)
    # the real file's extra lists: trainval, and small fixed subsets for quick evaluation
    splits.update(trainval=splits["train"] + splits["val"], minival=splits["val"][:len(splits["val"]) // 4],
                  minitest=splits["test"][:len(splits["test"]) // 4])
    write_json(problems, out / "problems.json")                  # one problem per line
    write_json(splits, out / "pid_splits.json")
    write_json({"captions": captions}, out / "captions.json", depth=2)


# ---------------------------------------------------------------------------------------------
# COCO-Karpathy layout

def coco_captions(rng: random.Random, objects: list[dict]) -> list[str]:
    """Five different template captions for a shapes picture, mixing objects and their relations."""
    def listing():
        return join_and([f"a {name(o)}" for o in rng.sample(objects, len(objects))])

    def pair_on(axis, words):
        pairs = [(a, b) for a in objects for b in objects if b[axis] - a[axis] >= GAP]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return rng.choice([f"a {name(a)} {words[0]} a {name(b)}", f"a {name(b)} {words[1]} a {name(a)}"])

    def extreme():
        edge = rng.choice(list(EDGES))
        axis, best = EDGES[edge]
        ranked = sorted(objects, key=lambda o: o[axis], reverse=best is max)
        if abs(ranked[0][axis] - ranked[1][axis]) < GAP:
            return None
        return f"the {name(ranked[0])} is closest to the {edge} of the picture"

    def counts():
        words = ["no", "one", "two", "three", "four"]
        parts = [f"{words[k]} {plural(s) if k > 1 else s}" for s in SHAPES if (k := sum(o['shape'] == s for o in objects))]
        return f"{join_and(parts)} on a light background"

    def near():
        a, b = min(((a, b) for a in objects for b in objects if a is not b),
                   key=lambda p: math.dist((p[0]["x"], p[0]["y"]), (p[1]["x"], p[1]["y"])))
        return f"a {name(a)} next to a {name(b)}"

    makers = [lambda: f"{['two', 'three', 'four'][len(objects) - 2]} shapes: {listing()}",
              lambda: f"a picture of {listing()}", lambda: pair_on("x", ("to the left of", "to the right of")),
              lambda: pair_on("y", ("above", "below")), extreme, counts, near,
              lambda: f"{listing()} on a plain background", lambda: f"some shapes: {listing()}"]
    out = []
    for make in rng.sample(makers, len(makers)):
        if (c := make()) and c not in out:
            out.append(c)
    return out[:5]


def make_coco(out: Path, sizes: dict[str, int] = COCO_SIZES, seed: int = COCO_SEED) -> None:
    rng = Rng(seed)
    images, sentid = [], 0
    for split, n in sizes.items():
        filepath = "train2014" if split == "train" else "val2014"   # Karpathy's restval/val/test come from val2014
        for _ in range(n):
            imgid = len(images)
            cocoid = 100000 + 37 * imgid       # arbitrary but unique, like real COCO ids
            img, objects = draw_scene(rng)
            filename = f"COCO_{filepath}_{cocoid:012d}.png"
            write_png(img, out / filepath / filename)
            raws = coco_captions(rng, objects)
            sentences = []
            for raw in raws:
                raw = raw[0].upper() + raw[1:] + "."
                tokens = raw.lower().replace(",", " ").replace(":", " ").replace(".", " ").split()
                sentences.append(dict(tokens=tokens, raw=raw, imgid=imgid, sentid=sentid))
                sentid += 1
            images.append(dict(filepath=filepath, sentids=[s["sentid"] for s in sentences], filename=filename,
                               imgid=imgid, split=split, sentences=sentences, cocoid=cocoid))
    write_json({"images": images, "dataset": "coco"}, out / "dataset_coco.json", depth=2)  # one image per line


# ---------------------------------------------------------------------------------------------
# Text corpus for pretraining the tiny decoder (different seed from the datasets)

def describe(objects: list[dict], kind: str = "shapes") -> str:
    """A picture in words, with every clear relation spelled out."""
    if kind == "map":
        parts = ["North is at the top of the map. The map shows " +
                 join_and([f"the {o['colour']} town" for o in objects]) + "."]
        for a in objects:
            for b in objects:
                if b["y"] - a["y"] >= GAP:
                    parts.append(f"The {a['colour']} town is north of the {b['colour']} town.")
                if b["x"] - a["x"] >= GAP:
                    parts.append(f"The {a['colour']} town is west of the {b['colour']} town.")
        return " ".join(parts)
    parts = ["The picture shows " + join_and([f"a {name(o)}" for o in objects]) + "."]
    for a in objects:
        for b in objects:
            if b["x"] - a["x"] >= GAP:
                parts.append(f"The {name(a)} is to the left of the {name(b)}.")
            if b["y"] - a["y"] >= GAP:
                parts.append(f"The {name(a)} is above the {name(b)}.")
    return " ".join(parts)


ORDERS = {"shapes": {"Left to right": ("x", False), "Right to left": ("x", True), "Top to bottom": ("y", False),
                     "Bottom to top": ("y", True)},
          "map": {"West to east": ("x", False), "East to west": ("x", True), "North to south": ("y", False),
                  "South to north": ("y", True)}}


def scene_in_words(objects: list[dict], kind: str = "shapes") -> str:
    """The picture in words for the *oracle* bound (problems.json "description") and for the decoder's
    pretraining: every fact a picture question can ask about, each where a lookup finds it. The objects in
    order along each direction (relations, extremes, owners, the farthest town: the first listed wins),
    the counts, the one shape beside another, the nearest shape, the clear direction between two towns."""
    def nm(o):
        return f"the {o['colour']} town" if kind == "map" else f"the {name(o)}"

    parts = [f"{label}: " + ", ".join(nm(o)[4:] for o in sorted(objects, key=lambda o: o[axis], reverse=rev)) + "."
             for label, (axis, rev) in ORDERS[kind].items()]
    if kind == "map":
        parts += [f"{nm(a).capitalize()} is {d} of {nm(b)}." for i, a in enumerate(objects) for b in objects[i + 1:]
                  if (d := clear_direction(a, b))]
        return " ".join(parts)
    parts.append("Counts: " + ", ".join(f"{sum(o['colour'] == c for o in objects)} {c}" for c in COLOURS) + "; " +
                 ", ".join(f"{sum(o['shape'] == s for o in objects)} {plural(s)}" for s in SHAPES) + ".")
    parts += [f"The only shape {side} {nm(anchor)} is {nm(other)}."
              for anchor in objects for side in SIDES if (other := only_beyond(objects, anchor, side))]
    parts += [f"{nm(others[0]).capitalize()} is nearest to {nm(t)}."
              for t in (objects if len(objects) >= 3 else []) if (others := nearest_to(objects, t))]
    return " ".join(parts)


def scene_facts(objects: list[dict], kind: str = "shapes") -> str:
    """A picture in words, each fact in the wording a step-wise solution uses for it ("The red circle is in
    column 2, row 5.", "The number of red shapes is 1.", ...), so a solution's look-ups are copies: the
    step-wise decoder's pretraining (stepwise.py) and, with --facts, the oracle's context."""
    if kind == "map":
        return " ".join(f"The {o['colour']} town is in column {cell(o, 'x')}, row {cell(o, 'y')}."
                        for o in objects)
    parts = [f"The {name(o)} is in column {cell(o, 'x')}, row {cell(o, 'y')}." for o in objects]
    parts += [f"The number of {c} shapes is {sum(o['colour'] == c for o in objects)}." for c in COLOURS]
    parts += [f"The number of {plural(s)} is {sum(o['shape'] == s for o in objects)}." for s in SHAPES]
    parts += [f"The shape closest to the {edge} is the {name(first)}." for edge, (axis, best) in EDGES.items()
              if (first := first_clearly(objects, axis, best))]
    parts += [f"The shape {side} the {name(anchor)} is the {name(other)}."
              for anchor in objects for side in SIDES if (other := only_beyond(objects, anchor, side))]
    parts += [f"The shape nearest to the {name(t)} is the {name(others[0])}."
              for t in (objects if len(objects) >= 3 else []) if (others := nearest_to(objects, t))]
    return " ".join(parts)


PICTURE_TYPES = [q_relation, q_extreme, q_colour_beside, q_count, q_compare_count, q_nearest, q_owner,
                 q_map_farthest, q_map_direction]


LOOKUP_WORDS = sorted({w for ws in WORD_KINDS.values() for w in ws} | set(DICTIONARY) | set(SHAPES) | set(COLOURS)
                      | set(DIRECTIONS) | set(NAMES) | set(TOWNS) | {"yes", "no", "attract", "repel"} | set(MIXES))


def q_lookup(rng):
    """Pretraining only: find a word among the options (the lettered-choice format itself, no knowledge)."""
    words = rng.sample(LOOKUP_WORDS, rng.randint(2, 4))
    want = rng.choice(words)
    return Q(rng.choice([f"Which option is {want}?", f'Which choice says "{want}"?', f"Find {want}."]), words, want,
             solution=f"The option that says {want}.")


def text_corpus(seed: int, n: int) -> list[str]:
    """n toy documents: questions in the fine-tuning format (text and hint questions; pictures described in
    words; lookups of a word among the options), captions, pictures in words and lessons.

    Questions are complete fine-tuning sequences (prompt + target, model/data.py), so the pretrained
    decoder knows the language and the answer format; picture questions carry the picture *in words*
    in the context, in the oracle bound's own words (`scene_in_words`), so the decoder can reason about a
    scene before any PEFT, as LLaMA can; at fine-tuning time (context "N/A") only the image can answer them. The lookup
    questions ("Which option is blue?") are short and teach the one skill every answer needs, reading
    the letter of a choice, as an instruction-tuned LLaMA already can.
    """
    from model.data import scienceqa_prompt, scienceqa_target
    rng = Rng(seed)
    text_types = [t for t in QTYPES if t.make not in PICTURE_TYPES]
    picture_types = [t for t in QTYPES if t.make in PICTURE_TYPES]
    docs = []
    for _ in range(n):
        r = rng.random()
        if r < 0.9:                    # a question: 35% a picture in words, 45% text or hint, 10% lookup
            if r < 0.35:               # the picture in words exactly as the oracle bound states it
                q = rng.choices(picture_types, weights=[t.weight for t in picture_types])[0].make(rng)
                context = (q.hint + " " if q.hint else "") + scene_in_words(q.scene, q.kind)
            elif r < 0.8:
                t = rng.choices(text_types, weights=[t.weight for t in text_types])[0]
                q = t.make(rng)
                context = q.hint
            else:
                q = q_lookup(rng)
                context = ""
            choices = order_choices(rng, q)
            docs.append(scienceqa_prompt(q.question, choices, context) + scienceqa_target(choices.index(q.answer)))
        elif r < 0.95:                 # plain sentences: captions, pictures in words, lessons
            _, objects = draw_scene(rng)
            docs.append(" ".join(c[0].upper() + c[1:] + "." for c in coco_captions(rng, objects)))
        elif r < 0.975:
            kind = rng.choice(["shapes", "map"])
            docs.append(describe(draw_scene(rng, kind)[1], kind))
        else:
            docs.append(" ".join(dict.fromkeys(t.lecture for t in rng.sample(QTYPES, 4))))
    return docs


# ---------------------------------------------------------------------------------------------
# Deterministic writers

def write_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=9)     # no timestamps or text chunks: same pixels -> same bytes


def dumps(obj, depth: int) -> str:
    """JSON with the outer `depth` levels one item per line: compact, yet diffs and greps well."""
    if depth == 0 or not isinstance(obj, (dict, list)) or not obj:
        return json.dumps(obj)
    if isinstance(obj, dict):
        return "{\n" + ",\n".join(f"{json.dumps(k)}: {dumps(v, depth - 1)}" for k, v in obj.items()) + "\n}"
    return "[\n" + ",\n".join(dumps(v, depth - 1) for v in obj) + "\n]"


def write_json(obj, path: Path, depth: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(obj, depth) + "\n")


def make_words(path: Path, seed: int = WORDS_SEED, docs: int = 4000, min_count: int = 2) -> None:
    """The tiny presets' word list (model/tokenizer.py WordTokenizer): every multi-byte piece seen at least
    `min_count` times in a sample of the toy text, sorted. A piece-level vocabulary "trained" on the toy
    corpus, as BPE vocabularies are trained on theirs."""
    import re
    from collections import Counter
    from model.tokenizer import WordTokenizer
    counts = Counter(p for d in text_corpus(seed, docs) for p in re.findall(WordTokenizer.PATTERN, d))
    words = sorted(p for p, c in counts.items() if c >= min_count and len(p.encode("utf-8")) > 1)
    path.write_text("".join(json.dumps(w) + "\n" for w in words))


def main(out: Path = HERE) -> None:
    for name, make in (("scienceqa", make_scienceqa), ("coco", make_coco)):
        shutil.rmtree(out / name, ignore_errors=True)     # no stale files from an older layout
        make(out / name)
    make_words(out / "words.txt")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Write the toy datasets (default: the committed ones, in tiny_data/).")
    ap.add_argument("--scienceqa", type=Path, metavar="DIR",
                    help="write only a toy ScienceQA into DIR (with --shuffle / --seed), not the committed files")
    ap.add_argument("--shuffle", action="store_true", help="shuffle every question's choices, as ScienceQA does")
    ap.add_argument("--seed", type=int, default=SCIENCEQA_SEED)
    ap.add_argument("--facts", action="store_true",
                    help="describe each picture (the oracle's context) in the step-wise solutions' wording")
    a = ap.parse_args()
    if a.scienceqa:
        shutil.rmtree(a.scienceqa, ignore_errors=True)
        make_scienceqa(a.scienceqa, seed=a.seed, shuffle=a.shuffle, facts=a.facts)
    elif a.shuffle or a.facts or a.seed != SCIENCEQA_SEED:
        ap.error("--shuffle, --facts and --seed write another set: give its directory with --scienceqa DIR")
    else:
        main()

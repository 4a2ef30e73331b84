"""Another generator's ScienceQA-format set (tests/other_world.py): read in every format, its solutions' hops
found without any of tiny_data's wording, and the step-wise solutions right about its own pictures."""
import json
from collections import Counter

import pytest
from PIL import Image

import other_world
from model.data import read_scienceqa
from model.metrics import hop_record, solution_steps, step_kinds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    other_world.write(root, n_train=120, n_test=40, seed=3)
    return root


def test_read_in_every_format(world):
    problems = json.loads((world / "problems.json").read_text())
    for fmt in ("QCM-A", "QCM-EA", "QCM-LEA"):
        notes = []
        examples = read_scienceqa(world, "train", prompt_format=fmt, log=notes.append)
        assert len(examples) == 120 and not notes              # every item has a solution: none falls back
        for e in examples[:10]:
            p = problems[e.id]
            letter = "ABCD"[p["answer"]]
            assert e.target.endswith(f"The answer is {letter}.")
            assert (p["solution"] in e.target) == (fmt != "QCM-A")


def test_hops_are_found_in_its_solutions(world):
    """Facts are the numbers the question does not give, the comparison uses only numbers stated before."""
    problems = json.loads((world / "problems.json").read_text())
    kinds_by_type = {}
    for p in problems.values():
        steps = solution_steps(p["solution"])
        kinds_by_type.setdefault(p["category"], set()).add(tuple(step_kinds(steps, p["question"] + " " + p["hint"])))
        h = hop_record(p["solution"], p["solution"], p["question"] + " " + p["hint"], True)
        assert h["names"] == h["facts_right"] == h["facts"] and h["answer"] and h["letter"]
    assert kinds_by_type["Which of two"] == {("fact", "fact", "derived", "answer")}
    assert kinds_by_type["Left or below"] == {("fact", "fact", "derived", "answer")}
    assert kinds_by_type["How many"] == {("fact", "answer")}
    assert kinds_by_type["Who has more"] == {("derived", "answer")}            # its numbers are in the hint


def test_its_solutions_are_right_about_its_pictures(world):
    """Each picture's stated positions are where the shapes are drawn (column = x // 8 + 1), and the answer
    among shuffled choices follows the comparison."""
    problems = json.loads((world / "problems.json").read_text())
    letters, checked = Counter(), 0
    for pid, p in problems.items():
        letters[p["answer"]] += 1
        if p["category"] not in ("Which of two", "Left or below"):
            continue
        img = Image.open(world / "images" / p["split"] / pid / "image.png").convert("RGB")
        for step in solution_steps(p["solution"])[:2]:                   # "The red circle is in column 3."
            words = step.rstrip(".").split()
            colour, line, cell = words[1], words[-2], int(words[-1])
            rgb = other_world.COLOURS[colour]
            at = [(x, y) for x in range(64) for y in range(64) if img.getpixel((x, y)) == rgb]
            i = 0 if line == "column" else 1
            lo, hi = min(a[i] for a in at), max(a[i] for a in at)
            if hi - lo >= other_world.SIZE:                 # two shapes of that colour: not this check's case
                continue
            assert (lo + hi + 1) // 2 // other_world.CELL + 1 == cell
            checked += 1
    assert checked > 20
    assert len(letters) >= 2 and max(letters.values()) < 0.75 * len(problems)     # choices shuffled

"""ScienceQA's output formats (train.prompt_format): QCM-A answers at once; QCM-EA and QCM-LEA write the
solution (and the lecture) first. Targets, the fallback note and the loss over the whole target, on a small
ScienceQA-format set written here (none of tiny_data's wording)."""
import json
from pathlib import Path

import pytest
from PIL import Image

from model import get_config
from model.config import apply_overrides
from model.data import DataError, Example, VLDataset, collate, read_scienceqa, scienceqa_target
from model.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# A small ScienceQA-format set: its own questions, lectures and solutions, some items without them

def problem(i: int, split: str, image: bool, lecture, solution) -> dict:
    p = {"question": f"Which jar holds more marbles, number {i}?", "choices": ["the tall jar", "the wide jar", "neither"],
         "answer": i % 3, "hint": "" if image else f"The tall jar holds {i} marbles.",
         "image": "image.png" if image else None, "grade": f"grade{1 + i % 12}",
         "subject": ["natural science", "social science", "language science"][i % 3], "split": split,
         "category": "Jars in a photo" if image else "Jars in a story"}
    if lecture is not ...:                     # ...: the field is absent
        p["lecture"] = lecture
    if solution is not ...:
        p["solution"] = solution
    if image:
        p["description"] = f"A tall jar with {i} marbles stands left of a wide jar."
    return p


def write_set(root: Path, n_train: int = 16, n_test: int = 8) -> dict:
    """problems.json, pid_splits.json and a few images; every fourth item lacks a solution (absent, null or
    empty), every third a lecture; lectures and solutions carry stray spaces and a newline."""
    problems, splits = {}, {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        image = i % 2 == 0
        lecture = [..., None, ""][i % 9 // 3] if i % 3 == 0 else "  Marbles fill a jar.\nTall jars hold more. "
        solution = [..., None, "  "][i % 12 // 4] if i % 4 == 0 else f" Count them: {i} marbles. "
        pid = str(100 + i)
        problems[pid] = problem(i, split, image, lecture, solution)
        splits[split].append(pid)
        if image:
            folder = root / "images" / split / pid
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), (20 * (i % 12), 200, 90)).save(folder / "image.png")
    root.mkdir(exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return problems


# ---------------------------------------------------------------------------------------------
# Targets and reading

def test_targets_as_scienceqa_writes_them():
    assert scienceqa_target(1) == " The answer is B."
    assert scienceqa_target(1, "QCM-A", "A lecture.", "A solution.") == " The answer is B."
    assert scienceqa_target(0, "QCM-EA", "A lecture.", " A solution. ") == " A solution. The answer is A."
    assert scienceqa_target(2, "QCM-LEA", " A lecture.\n", "A solution.") == " A lecture. A solution. The answer is C."
    assert scienceqa_target(2, "QCM-LEA", "Line one.\nLine two.", "") == " Line one.\nLine two. The answer is C."
    assert scienceqa_target(2, "QCM-LEA", "  ", "A solution.") == " A solution. The answer is C."   # no double space
    assert scienceqa_target(3, "QCM-EA", "A lecture.", "") == " The answer is D."                  # the answer alone
    with pytest.raises(ValueError, match="QCM-A, QCM-EA, QCM-LEA"):
        scienceqa_target(0, "QCM-AE")


def test_read_each_format_and_count_the_items_without_text_in_one_note(tmp_path):
    problems = write_set(tmp_path)
    for fmt in ("QCM-A", "QCM-EA", "QCM-LEA"):
        notes = []
        examples = read_scienceqa(tmp_path, "train", prompt_format=fmt, log=notes.append)
        for e in examples:
            p = problems[e.id]
            lecture, solution = (p.get("lecture") or "").strip(), (p.get("solution") or "").strip()
            assert e.info["lecture"] == lecture and e.info["solution"] == solution
            assert e.target == scienceqa_target(p["answer"], fmt, lecture, solution)
            assert e.prompt.endswith("\nResponse:") and "The answer is" not in e.prompt     # the prompt is the same
        alone = [e for e in examples if e.target == scienceqa_target(e.info["answer"])]
        if fmt == "QCM-A":
            assert notes == [] and len(alone) == len(examples)
        else:
            want = "solution" if fmt == "QCM-EA" else "lecture or solution"
            assert len(alone) == (4 if fmt == "QCM-EA" else 2)      # pids 0, 4, 8, 12; of those 0 and 12 lack both
            assert notes == [f"note: {len(alone)} of 16 items of {tmp_path / 'problems.json'} (split 'train') have "
                             f"no {want}: their target is the answer alone"]
    e = next(e for e in read_scienceqa(tmp_path, "train", prompt_format="QCM-LEA", log=print) if e.id == "101")
    assert e.target == " Marbles fill a jar.\nTall jars hold more. Count them: 1 marbles. The answer is B."


@pytest.mark.parametrize("key,value", [("solution", 3), ("lecture", ["a", "b"]), ("solution", {"text": "x"})])
def test_a_lecture_or_solution_that_is_not_text_is_a_one_line_error(tmp_path, key, value):
    problems = write_set(tmp_path)
    problems["105"][key] = value
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(DataError) as info:
        read_scienceqa(tmp_path, "train")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "problems.json") in msg and "problem '105'" in msg
    assert f"has {key} {value!r}; expected a string or null" in msg


def test_an_unknown_format_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError) as info:
        apply_overrides(get_config("tiny"), ["train.prompt_format=QCM-AE"])
    assert str(info.value) == "train.prompt_format must be one of QCM-A, QCM-EA, QCM-LEA, got 'QCM-AE'"
    with pytest.raises(ValueError, match="train.gen_tokens must be >= 0"):
        apply_overrides(get_config("tiny"), ["train.gen_tokens=-1"])


def test_the_loss_covers_the_whole_target(tmp_path):
    """Everything after the prompt is supervised: the lecture and solution tokens, the answer and EOS."""
    write_set(tmp_path)
    examples = read_scienceqa(tmp_path, "train", prompt_format="QCM-LEA", log=lambda *a: None)
    ds = VLDataset(examples, TOK, 32)
    b = collate([ds[i] for i in range(len(examples))], TOK.pad_id)
    for row, e in enumerate(examples):
        kept = b["targets"][row][b["targets"][row] != -100].tolist()
        assert kept == TOK.encode(e.target) + [TOK.eos_id]
    assert any(len(e.target) > 60 for e in examples)                  # lecture and solution, not the answer alone

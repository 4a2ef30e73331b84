"""ScienceQA's output formats (train.prompt_format): QCM-A answers at once; QCM-EA and QCM-LEA write the
solution (and the lecture) first. Targets, the fallback note, the loss over the whole target, the letter read
from generated text, the stop rule, solution metrics, and each format end to end on a small ScienceQA-format
set written here (none of tiny_data's wording)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from PIL import Image

from model import get_config
from model.config import apply_overrides
from model.data import DataError, Example, VLDataset, collate, read_scienceqa, scienceqa_target
from model.evaluate import evaluate_scienceqa, generation_budget
from model.metrics import answer_complete, generation_metrics, generation_table, parse_generated, solution_text
from model.tokenizer import ByteTokenizer
from model.vlm import build

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


# ---------------------------------------------------------------------------------------------
# Reading the answer, the stop rule, solution metrics

@pytest.mark.parametrize("text, n_choices, expected", [
    ("Both jars are full. The answer is B.", 3, 1),
    ("The answer is (B).", 3, 1), ("The answer is (C)", 3, 2),
    ("The answer is B. Then more text. The answer is A.", 3, 1),   # the first one counts
    ("The answer is D.", 3, None),                                  # past the last option
    ("B.", 3, None), ("", 3, None), ("the answer is B.", 3, None),  # none
    ("The answer is Blue.", 3, None),                               # a word, not a letter
    ("I think the jar. The answer is A because it is tall", 3, 0),  # text after
])
def test_parse_generated(text, n_choices, expected):
    assert parse_generated(text, n_choices) == expected


def test_answer_complete_is_the_whole_sentence():
    assert answer_complete("Count them. The answer is B.") and answer_complete("The answer is (C).")
    assert answer_complete("The answer is A. And then")
    for partial in ("Count them. The answer is", "The answer is B", "The answer is (B)", "The answer is Blue."):
        assert not answer_complete(partial), partial


def test_solution_text():
    assert solution_text(" Count  them:\n3 marbles.  The answer is B.") == "Count them: 3 marbles."
    assert solution_text(" The answer is B.") == "" and solution_text("no answer at all ") == "no answer at all"


def record(t, correct, match, unparsed=False, image=False):
    return {"type": t, "correct": correct, "solution_match": match, "unparsed": unparsed, "has_image": image}


def test_generation_metrics_on_hand_made_records():
    records = [record("jars", True, True, image=True), record("jars", False, True, image=True),
               record("jars", True, False, image=True), record("jars", False, None, unparsed=True, image=True),
               record("words", True, False), record("words", False, False, unparsed=True)]
    m = generation_metrics(records)
    jars, words, all_ = m["by_type"]["jars"], m["by_type"]["words"], m["all"]
    assert (jars["n"], jars["unparsed"], jars["with_solution"], jars["image"]) == (4, 1, 3, True)
    assert jars["solution_match"] == pytest.approx(200 / 3) and jars["acc_match"] == 50 and jars["acc_mismatch"] == 100
    assert words["solution_match"] == 0 and words["acc_match"] is None and words["acc_mismatch"] == 50
    assert (all_["n"], all_["unparsed"], all_["with_solution"]) == (6, 2, 5)
    assert all_["solution_match"] == 40 and all_["acc_match"] == 50 and all_["acc_mismatch"] == pytest.approx(200 / 3)
    lines = generation_table(m).splitlines()
    assert lines[0].split() == ["question", "type", "n", "unparsed", "with", "sol.", "sol.", "=", "acc", "|", "=",
                                "acc", "|", "≠"]
    assert lines[1].split() == ["jars", "4", "1", "3", "66.67", "50.00", "100.00"]     # picture types first
    assert lines[2].split() == ["words", "2", "1", "2", "0.00", "-", "50.00"]
    assert lines[3].split() == ["all", "6", "2", "5", "40.00", "50.00", "66.67"]
    none = generation_metrics([record("jars", True, None)])["all"]                     # no gold solution anywhere
    assert none["with_solution"] == 0 and none["solution_match"] is None and none["acc_match"] is None


@pytest.mark.parametrize("fmt", ["QCM-A", "QCM-EA"])
def test_visualize_answers_in_the_runs_format(fmt, tmp_path, monkeypatch):
    """The figures' answer is generated as evaluation generates it: QCM-A reads a few tokens after " The answer
    is"; QCM-EA continues the prompt itself (the solution first) until "The answer is X." or its budget."""
    from tools.visualize import draw_figures
    cfg = apply_overrides(get_config("tiny"), [f"train.prompt_format={fmt}", "train.gen_tokens=40"])
    tok = ByteTokenizer()
    model = build(cfg).eval()
    calls = []

    def generate(tokens, z, budget, eos_id, stop=None):
        calls.append((tokens[0].tolist(), budget, stop))
        return [tok.encode(" So yes. The answer is A.")]
    monkeypatch.setattr(model, "generate", generate)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "x.png")
    prompt = "Question: Is it red?\nOptions: (A) yes (B) no\nResponse:"
    answer, *_ = draw_figures(model, tok, tmp_path / "x.png", prompt, tmp_path, torch.device("cpu"))
    ids, budget, stop = calls[0]
    assert answer == " So yes. The answer is A."
    if fmt == "QCM-A":
        assert ids == [tok.bos_id] + tok.encode(prompt + " The answer is") and budget == 8 and stop is None
    else:
        assert ids == [tok.bos_id] + tok.encode(prompt) and budget == 40
        assert stop(tok.encode(" So yes. The answer is A.")) and not stop(tok.encode(" So yes."))


def test_each_row_stops_at_its_own_stop_rule():
    """LSRM.generate(stop=...): a row ends once its tokens so far satisfy the rule, the others go on; the tokens
    before are exactly those of the unstopped run."""
    torch.manual_seed(0)
    model = build(get_config("tiny")).eval()
    tokens = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    free = model.generate(tokens, None, 8, eos_id=0)
    mark = free[0][2]                                                    # row 0 stops after its third token
    stopped = model.generate(tokens, None, 8, eos_id=0, stop=lambda ids: ids[-1] == mark)
    for row, out in zip(free, stopped):
        cut = row.index(mark) + 1 if mark in row else len(row)
        assert out == row[:cut]
    assert len(stopped[0]) <= 3 and any(len(s) == 8 for s in stopped)      # a row stopped, another went on


def test_evaluation_reads_generated_text_and_compares_solutions(monkeypatch):
    """QCM-A reads four tokens after " The answer is"; the other formats generate from the prompt up to the
    budget with the answer-sentence stop, read "The answer is X" and compare the solutions."""
    import model.evaluate as ev
    info = dict(subject="natural science", grade="grade3", has_hint=False, has_image=False, type="jars",
                choices=["a", "b", "c"], answer=1)
    examples = [Example(str(i), "Question: ?\nResponse:", " Count them. The answer is B.", None, dict(info))
                for i in range(4)] + [Example("4", "Question: ?\nResponse:", " The answer is B.", None, dict(info))]
    outputs = [" Count them.  The answer is B.", " Count\nthem. The answer is (A).", " Guess. The answer is B.",
               " Count them not.", " Anything. The answer is B."]
    calls = []

    def fake(model, dataset, tokenizer, prefix, max_new_tokens, batch, device, log=None, decoder_only=False,
             stop_text=None):
        calls.append((prefix, max_new_tokens, stop_text))
        return outputs

    monkeypatch.setattr(ev, "run_generation", fake)
    model = SimpleNamespace(cfg=get_config("tiny"))
    metrics, records = evaluate_scienceqa(model, None, examples, TOK, "cpu", prompt_format="QCM-EA", gen_tokens=40)
    assert calls == [("", 40, answer_complete)]
    assert [r["pred"] for r in records] == [1, 0, 1, None, 1] and [r["unparsed"] for r in records] == [0, 0, 0, 1, 0]
    assert [r["solution_match"] for r in records] == [True, True, False, False, None]
    assert records[1]["solution"] == "Count them." and records[4]["gold_solution"] == ""
    assert metrics["Avg"] == 60
    g = generation_metrics(records)["all"]
    assert (g["unparsed"], g["with_solution"], g["solution_match"], g["acc_match"], g["acc_mismatch"]) == (1, 4, 50, 50, 50)
    calls.clear()
    outputs[:] = [" B.", " A", " B", "", " C."]
    metrics, records = evaluate_scienceqa(model, None, examples, TOK, "cpu")
    assert calls == [(" The answer is", 4, None)] and [r["pred"] for r in records] == [1, 0, 1, None, 2]
    assert "solution" not in records[0] and metrics["Avg"] == 40


def test_the_generation_budget():
    examples = [Example("0", "p", " The answer is A.", None), Example("1", "p", " " + "x" * 30 + " The answer is A.", None)]
    assert generation_budget(examples, TOK, 0, 2048) == len(TOK.encode(examples[1].target)) + 16
    assert generation_budget(examples, TOK, 0, 40) == 40 and generation_budget(examples, TOK, 7, 2048) == 7


# ---------------------------------------------------------------------------------------------
# Each format end to end: train + eval through the command line, random tiny backbones

run = run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sqa")
    write_set(root)
    return root


@pytest.mark.parametrize("fmt", ["QCM-A", "QCM-EA", "QCM-LEA"])
def test_each_format_trains_and_evaluates_end_to_end(data, tmp_path, fmt):
    out = tmp_path / "run"
    r = run("train", "--out", out, "--set", "train.pretrained=false", "--set", f"train.data={data}",
            "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", f"train.prompt_format={fmt}")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert m["n"] == len(records) == 8 and "step     2/2" in r.stdout
    gen = m["generation"]
    assert gen["format"] == fmt and set(gen) == {"format", "gen_tokens", "LSRM", "blind", "oracle"}
    for name in ("LSRM", "blind", "oracle"):
        assert gen[name]["all"]["n"] == 8 and set(gen[name]["by_type"]) == {"Jars in a photo", "Jars in a story"}
        assert gen[name]["all"]["unparsed"] == sum(t["unparsed"] for t in gen[name]["by_type"].values())
    assert gen["LSRM"]["all"]["unparsed"] == sum(r["unparsed"] for r in records)
    if fmt == "QCM-A":
        assert gen["gen_tokens"] is None and "solution" not in records[0] and "written from the prompt" not in r.stdout
        assert "note:" not in r.stdout
        return
    assert f"of 16 items of {data / 'problems.json'} (split 'train') have no" in r.stdout
    assert gen["gen_tokens"] > 16 and gen["LSRM"]["all"]["with_solution"] == sum(bool(r["gold_solution"]) for r in records)
    for rec in records:
        assert set(rec) >= {"output", "pred", "unparsed", "solution", "gold_solution", "solution_match"}
        assert rec["unparsed"] == (rec["pred"] is None) and rec["solution_match"] in (True, False, None)
    for name in ("LSRM", "blind", "oracle"):
        assert f"\n{name}: {fmt}, written from the prompt (at most {gen['gen_tokens']} new tokens)\n" in r.stdout
    if fmt == "QCM-EA":                               # the format travels with the checkpoint
        r = run("eval", "--ckpt", out / "checkpoint.pt", "--out", tmp_path / "eval.json")
        assert r.returncode == 0, r.stderr[-3000:]
        again = json.loads((tmp_path / "eval.json").read_text())
        assert again["metrics"] == m["metrics"] and again["generation"] == gen


def test_an_unknown_format_is_a_one_line_error(tmp_path):
    r = run("train", "--out", tmp_path / "run", "--set", "train.prompt_format=QCM-AE")
    assert r.returncode == 2 and r.stderr == ("error: train.prompt_format must be one of QCM-A, QCM-EA, QCM-LEA, "
                                              "got 'QCM-AE'\n")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The solution step by step (hops) and the teacher-forced read of each looked-up fact

from model.evaluate import fact_positions, fact_probe                      # noqa: E402
from model.metrics import hop_metrics, hop_record, hop_table, solution_steps, step_kinds  # noqa: E402

STEPWISE = "The left jar holds 4. The right jar holds 9. 4 is less than 9. So the right jar."


def test_steps_and_their_kinds():
    steps = solution_steps(STEPWISE)
    assert steps == ["The left jar holds 4.", "The right jar holds 9.", "4 is less than 9.", "So the right jar."]
    assert step_kinds(steps, "Which jar holds more?") == ["fact", "fact", "derived", "answer"]
    asked = solution_steps("The left jar holds 4. The right jar holds 9. Is 4 more than 9? no. So the right jar.")
    assert asked[2] == "Is 4 more than 9? no."                      # a question and its answer: one step
    assert step_kinds(asked, "Which jar holds more?") == ["fact", "fact", "derived", "answer"]
    # a number the question or hint states is not looked up; a step with no number is text
    assert step_kinds(["The left jar holds 4.", "Jars hold marbles.", "So 4."], "It holds 4 or 5.") == \
        ["derived", "text", "answer"]
    # a fact may repeat an earlier fact's number: stating it more often than before is what makes it a fact
    towns = solution_steps("The red town is in column 4, row 7. The blue town is in column 4, row 4. So north.")
    assert step_kinds(towns, "Which direction is the blue town from the red town?") == ["fact", "fact", "answer"]
    both_ways = solution_steps("The left jar holds 4. The right jar holds 9. Is 4 less than 9? yes. "
                               "Is 9 less than 4? no. So left.")             # each number once more: derived
    assert step_kinds(both_ways, "")[2:] == ["derived", "derived", "answer"]


@pytest.mark.parametrize("written, expected", [
    (STEPWISE, dict(facts=2, names=2, facts_right=2, derived=1, derived_right=1, text=0, text_right=0, answer=True, letter=True)),
    # the second fact's number wrong: its name still copied; nothing after it is scored
    ("The left jar holds 4. The right jar holds 3. 4 is more than 3. So the left jar.",
     dict(facts=2, names=2, facts_right=1, derived=0, derived_right=0, text=0, text_right=0, answer=None, letter=None)),
    # facts right, the comparison wrong: the answer is not scored, the letter is where the answer is right
    ("The left jar holds 4. The right jar holds 9. 4 is more than 9. So the right jar.",
     dict(facts=2, names=2, facts_right=2, derived=1, derived_right=0, text=0, text_right=0, answer=None, letter=True)),
    ("So the right jar.", dict(facts=2, names=0, facts_right=0, derived=0, derived_right=0, text=0, text_right=0, answer=None, letter=None)),
])
def test_hop_record(written, expected):
    assert hop_record(STEPWISE, written, "Which jar holds more?", correct=True) == expected


NEAREST = "The blue triangle is in column 2, row 7. The shape nearest to it is the yellow triangle. So yellow."


@pytest.mark.parametrize("written, text_right, answer", [
    (NEAREST, 1, True),
    # the look-up right, what the read found from it wrong: the text step is scored wrong, the answer not at all
    (NEAREST.replace("yellow", "green"), 0, None),
])
def test_a_step_with_no_number_is_scored_where_the_facts_are_right(written, text_right, answer):
    got = hop_record(NEAREST, written, "What colour is the shape nearest to the blue triangle?", correct=answer)
    assert (got["facts_right"], got["text"], got["text_right"], got["answer"]) == (1, 1, text_right, answer)
    wrong_fact = hop_record(NEAREST, written.replace("row 7", "row 6"), "", correct=False)
    assert (wrong_fact["text"], wrong_fact["text_right"]) == (0, 0)          # not scored after a wrong fact
    m = hop_metrics([dict(type="near", has_image=True, hops=got)])
    assert m["near"]["text_n"] == 1 and m["near"]["text"] == 100 * text_right
    assert hop_table(m).splitlines()[0].split()[6:8] == ["deriv|f", "text|f"]


def test_hop_metrics_and_table():
    records = [dict(type="jars", has_image=True, hops=hop_record(STEPWISE, w, "Which jar holds more?", c))
               for w, c in [(STEPWISE, True), (STEPWISE, False), (STEPWISE.replace("holds 9", "holds 3"), False)]]
    records.append(dict(type="words", has_image=False, hops=None))            # no gold solution: not counted
    m = hop_metrics(records)
    assert set(m) == {"jars", "all"} and m["jars"]["facts"] == 6 and m["jars"]["names"] == 100
    assert m["jars"]["fact"] == pytest.approx(500 / 6) and m["jars"]["derived"] == 100 and m["jars"]["letter"] == pytest.approx(100 / 3)
    table = hop_table(m, {"jars": (75.0, 25.0, 80.0, 30.0), "all": (75.0, 25.0, 80.0, 30.0)})
    assert table.splitlines()[1].split()[-4:] == ["75.00", "25.00", "80.00", "30.00"]


def test_fact_positions_are_the_looked_up_numbers():
    from model.tokenizer import WordTokenizer
    info = dict(question="Which jar holds more?", hint="")
    ex = Example("0", "Question: ?\nResponse:", f" {STEPWISE} The answer is B.", None, info)
    for tok in (TOK, WordTokenizer(ROOT / "tiny_data" / "words.txt")):
        ids = tok.encode(ex.target)
        assert [tok.decode(ids[a:b]) for a, b in fact_positions(ex, tok)] == [" 4", " 9"]


class Oracle(torch.nn.Module):
    """A stand-in model whose next token is always right, with its own pictures only (`needs_picture`)."""

    def __init__(self, needs_picture: bool):
        super().__init__()
        self.needs_picture, self.own = needs_picture, None

    def forward(self, tokens, images, has_image):
        logits = torch.full((*tokens.shape, 300), -1.0)
        logits[:, :-1].scatter_(-1, tokens[:, 1:, None], 1.0)
        if self.needs_picture and self.own is not None and not torch.equal(images, self.own):
            logits = logits.roll(1, -1)                                    # another picture: every token wrong
        self.own = images if self.own is None else self.own
        return logits


def test_fact_probe_separates_the_pictures_own_read(tmp_path):
    examples = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(path)
        info = dict(question="Which jar holds more?", hint="", has_image=True, type="jars")
        examples.append(Example(str(i), "Question: ?\nResponse:", f" {STEPWISE} The answer is B.", path, info))
    dataset = VLDataset(examples, TOK, 8)
    every = (100.0, 100.0, 100.0, 100.0)
    assert fact_probe(Oracle(False), dataset, examples, TOK, "cpu") == {"jars": every, "all": every}
    own = (100.0, 0.0, 100.0, 0.0)
    assert fact_probe(Oracle(True), dataset, examples, TOK, "cpu") == {"jars": own, "all": own}


class WrongAt(torch.nn.Module):
    """A stand-in model whose next token is right except where it is `token` (there it is the one after)."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def forward(self, tokens, images, has_image):
        nxt = tokens[:, 1:].clone()
        nxt[nxt == self.token] += 1
        return torch.nn.functional.one_hot(torch.cat([nxt, nxt[:, -1:]], 1), 300).float()


def test_fact_probe_counts_numbers_apart_from_items(tmp_path):
    path = tmp_path / "0.png"
    Image.new("RGB", (8, 8)).save(path)
    info = dict(question="Which jar holds more?", hint="", has_image=True, type="jars")
    examples = [Example(str(i), "Question: ?\nResponse:", f" {STEPWISE} The answer is B.", path, info) for i in range(2)]
    nine = TOK.encode(" 9")[-1]                # the second looked-up number's last token read wrong
    share = 100.0 * (len(TOK.encode(" 4")) + len(TOK.encode(" 9")) - 1) / (len(TOK.encode(" 4")) + len(TOK.encode(" 9")))
    got = fact_probe(WrongAt(nine), VLDataset(examples, TOK, 8), examples, TOK, "cpu")
    assert got["all"] == pytest.approx((0.0, 0.0, share, share))

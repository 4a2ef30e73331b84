"""The documents cannot rot. In tutorial.md, README.md, docs/*.md and tiny_data/README.md:

- every ```console block's commands are run and their output compared exactly;
- a ```text block after `<!-- output of: COMMAND -->` is found in what COMMAND prints, its lines in order
  (an excerpt may leave lines out); one after `<!-- checked: NAME (...) -->` is exactly what CHECKED[NAME]
  computes from committed files (the tiny run's checkpoint, the probe's JSON, the backbones), and so is a
  Markdown table right after such a marker (the ablation's tables, from docs/ablation.json);
- every ```python block appears verbatim (up to its indentation) in the file the text names before it;
- every `python lsrm.py ...` line of tutorial.md's ```bash blocks is run (training ones at smoke size) and
  must succeed (the other documents' command lines are parsed, not run: tests/test_docs.py)."""
import functools
import hashlib
import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import CHILD_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["tutorial.md", "README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
        "tiny_data/README.md"]
TEXT = {doc: (ROOT / doc).read_text() for doc in DOCS}
TUTORIAL = TEXT["tutorial.md"]
SMOKE = ["--set", "train.pretrained=false", "--set", "train.limit=32", "--set", "train.epochs=1",
         "--set", "train.batch_size=16", "--set", "train.eval_split=minitest",
         "--set", "train.gen_tokens=16"]     # random backbones write to the limit: keep it short
TINY_CKPT = "docs/tiny_run/checkpoint.pt"
TINY_EVAL = f"python lsrm.py eval --ckpt {TINY_CKPT}"
FENCE = re.compile(r"(?:^<!-- (output of|checked): ([^\n]*?) -->\n)?^```(\w*)\n(.*?)^```", re.S | re.M)


def fenced(doc: str):
    """(kind, marker, marker text, body, offset) of each fenced block of doc."""
    for m in FENCE.finditer(TEXT[doc]):
        yield m.group(3), m.group(1), m.group(2), m.group(4), m.start(3) - 3


def blocks(kind: str, docs=DOCS) -> list[tuple[str, str]]:
    return [(doc, body) for doc in docs for k, _, _, body, _ in fenced(doc) if k == kind]


def console_cases():
    for doc, block in blocks("console"):
        parts = re.split(r"^\$ ", block, flags=re.M)[1:]
        for part in parts:
            command, _, output = part.partition("\n")
            yield doc, command, output


def run(command: str, extra=()):
    argv = shlex.split(command.replace("\\\n", " "), comments=True)
    assert argv[0] == "python", command
    return subprocess.run([sys.executable, *argv[1:], *extra], cwd=ROOT, capture_output=True, text=True,
                          env=CHILD_ENV)


@functools.lru_cache(maxsize=None)
def output_of(command: str) -> str:
    if command == TINY_EVAL:                  # evaluated once (with --out, one line more) for its blocks and tables
        return tiny_eval()[0]
    r = run(command)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip("\n").splitlines()]


@pytest.mark.parametrize("doc,command,expected", list(console_cases()))
def test_console_output_is_what_the_document_shows(doc, command, expected):
    assert lines(output_of(command)) == lines(expected), f"{doc}: $ {command}"


# ---------------------------------------------------------------------------------------------
# Blocks that show part of a command's output, or what a test computes from committed files

def output_cases():
    return [(doc, text, body) for doc in DOCS for _, marker, text, body, _ in fenced(doc) if marker == "output of"]


def is_excerpt(want: list[str], have: list[str]) -> bool:
    """want's lines, in order, among have's (others may come between)."""
    it = iter(have)
    return all(any(w == h for h in it) for w in want)


@pytest.mark.parametrize("doc,command,block", output_cases())
def test_output_blocks_are_the_commands_output(doc, command, block):
    assert is_excerpt(lines(block), lines(output_of(command))), f"{doc}: not what `{command}` prints:\n{block}"


@functools.lru_cache(maxsize=None)
def tiny_eval() -> tuple[str, dict]:
    """The committed tiny run's evaluation (`eval --ckpt docs/tiny_run/checkpoint.pt`): what it prints, and
    the results as metrics.json holds them."""
    with tempfile.TemporaryDirectory() as tmp:
        r = run(TINY_EVAL, ["--out", str(Path(tmp) / "metrics.json")])
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout, json.loads((Path(tmp) / "metrics.json").read_text())


def tiny_run() -> dict:
    return tiny_eval()[1]


def tiny_chance() -> dict[str, float]:
    """Chance (1 / number of choices, averaged) per Table-1 column of the toy test split."""
    from model.checkpoint import load_checkpoint
    from model.metrics import COLUMNS, _columns_of
    root = ROOT / load_checkpoint(ROOT / TINY_CKPT)["config"]["train"]["data"]      # the set the run was tested on
    problems = json.loads((root / "problems.json").read_text())
    n, chance = Counter(), Counter()
    for pid in json.loads((root / "pid_splits.json").read_text())["test"]:
        p = problems[str(pid)]
        record = dict(subject=p["subject"], grade=p["grade"], has_hint=bool(p["hint"].strip()),
                      has_image=bool(p["image"]))
        for c in _columns_of(record):
            n[c] += 1
            chance[c] += 1 / len(p["choices"])
    return {c: 100 * chance[c] / n[c] for c in COLUMNS}


def tiny_summary() -> str:
    """README's results table: the tiny run over the Table-1 columns with chance, blind, oracle, gap closed."""
    from model.metrics import COLUMNS, gap_closed
    r = tiny_run()
    rows = {"chance": tiny_chance(), "blind": r["bounds"]["blind"], "LSRM": r["metrics"],
            "oracle": r["bounds"]["oracle"]}
    out = [" " * 10 + "".join(f"{c:>8}" for c in COLUMNS)]
    out += [f"{name:10}" + "".join(f"{m[c]:>8.2f}" for c in COLUMNS) for name, m in rows.items()]
    gaps = [gap_closed(rows["LSRM"][c], rows["blind"][c], rows["oracle"][c]) for c in COLUMNS]
    out.append(f"{'gap closed':10}" + "".join(f"{'-' if g is None else f'{g:.1f}%':>8}" for g in gaps))
    return "\n".join(out)


def probe_table() -> str:
    from tiny_data.probe import format_probe
    return format_probe(json.loads((ROOT / "figures" / "probe.json").read_text()))


def backbone_checksums() -> str:
    return "\n".join(f"sha256 {hashlib.sha256((ROOT / 'tiny_data/backbones' / f).read_bytes()).hexdigest()}  "
                     f"tiny_data/backbones/{f}" for f in ("vit.pt", "lm.pt", "lm_stepwise.pt"))


def ablation(part: str, file: str = "ablation.json") -> str:
    """docs/results.md's ablation tables, from a committed result of `python lsrm.py ablate` (its ablation.json):
    the ladder with each row's trainable parameters, or the δ/λ sweep."""
    from tools.ablate import tables
    return tables(json.loads((ROOT / "docs" / file).read_text()), part)


CHECKED = {"tiny run summary": tiny_summary, "probe table": probe_table, "backbone checksums": backbone_checksums,
           "ablation ladder": lambda: ablation("ladder"), "ablation sweep": lambda: ablation("sweep"),
           "step-wise ablation ladder": lambda: ablation("ladder", "ablation_stepwise.json")}
# a Markdown table (or two, a blank line between) after the marker: rendered as a table, checked as text
TABLE = re.compile(r"^<!-- checked: ([^\n]*?) -->\n((?:\|[^\n]*\n|\n(?=\|))+)", re.M)


def checked_cases():
    return [(doc, text.split(" (")[0], body) for doc in DOCS for _, marker, text, body, _ in fenced(doc)
            if marker == "checked"] + \
        [(doc, m.group(1).split(" (")[0], m.group(2)) for doc in DOCS for m in TABLE.finditer(TEXT[doc])]


@pytest.mark.parametrize("doc,name,block", checked_cases())
def test_checked_blocks_are_computed_from_committed_files(doc, name, block):
    assert name in CHECKED, f"{doc}: no check named {name!r}; known: {sorted(CHECKED)}"
    assert lines(block) == lines(CHECKED[name]()), f"{doc}: {name} is now:\n{CHECKED[name]()}"


def test_every_text_block_with_numbers_is_checked():
    """A ```text (or plain ```) block holding digits is an output or checked (measured tables are Markdown)."""
    loose = [(doc, body[:80]) for doc in DOCS for kind, marker, _, body, _ in fenced(doc)
             if kind in ("text", "") and marker is None and re.search(r"\d", body)]
    assert not loose, loose


# ---------------------------------------------------------------------------------------------
# tutorial.md's commands, run

BASH = [line for b in blocks("bash", ["tutorial.md"]) for line in b[1].replace("\\\n", " ").splitlines()
        if line.startswith("python lsrm.py")]


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tutorial-run")
    r = run("python lsrm.py train", [*SMOKE, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "checkpoint.pt"


@pytest.mark.parametrize("command", BASH)
def test_bash_commands_run(command, tmp_path, request):
    """train/ablate/probe at smoke size; commands that read a checkpoint read a smoke run's; outputs go to tmp."""
    extra = [*SMOKE, "--out", str(tmp_path)] if command.split()[2] in ("train", "ablate") else []
    if command.split()[2] == "ablate":         # one seed per ladder row and sweep point: 8 smoke runs
        extra += ["--seeds", "1", "--sweep-seeds", "1"]
    if command.split()[2] == "probe":          # random ViT, a few pictures and steps; nothing written to figures/
        extra = ["--set", "train.pretrained=false", "--train", "64", "--test", "32", "--steps", "5",
                 "--out", str(tmp_path)]
    if "--ckpt" in command:
        ckpt = str(request.getfixturevalue("smoke_ckpt"))
        command = re.sub(r"--ckpt \S+", lambda m: f"--ckpt {ckpt}", command)
        command = re.sub(r"--out \S+", lambda m: f"--out {tmp_path}", command)
    r = run(command, extra)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_documents_have_checks():
    assert len(list(console_cases())) >= 2 and BASH and output_cases() and len(checked_cases()) >= 3


# ---------------------------------------------------------------------------------------------
# Code excerpts

def python_blocks():
    """(document, block, the last repository file named before it: `model/x.py`, `tools/x.py` or `lsrm.py`)."""
    for doc in DOCS:
        for kind, _, _, body, start in fenced(doc):
            if kind == "python":
                named = re.findall(r"`((?:model/\w+|tools/\w+|tiny_data/\w+|lsrm)\.py)`", TEXT[doc][:start])
                yield doc, body, named[-1] if named else None


def occurs_verbatim(block: str, text: str) -> bool:
    """The block's lines, in order and consecutive, in text, all shifted right by the same indentation."""
    want = block.rstrip("\n").splitlines()
    lines_ = [line.rstrip() for line in text.splitlines()]
    for i in range(len(lines_) - len(want) + 1):
        pad = len(lines_[i]) - len(want[0])
        if pad >= 0 and all(lines_[i + j] == " " * pad + w.rstrip() for j, w in enumerate(want)):
            return True
    return False


@pytest.mark.parametrize("doc,block,file", list(python_blocks()))
def test_python_snippets_are_the_code(doc, block, file):
    assert file is not None, f"{doc}: no file named before the snippet:\n{block}"
    assert occurs_verbatim(block, (ROOT / file).read_text()), f"{doc}: not in {file} as shown:\n{block}"

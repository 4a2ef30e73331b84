"""tutorial.md cannot rot: every ```console block's commands are run and their output compared exactly;
every `python lsrm.py ...` line of a ```bash block is run (training ones at smoke size) and must succeed;
every ```python block appears verbatim (up to its indentation) in the file the text names before it."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHILD_ENV

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = (ROOT / "tutorial.md").read_text()
SMOKE = ["--set", "train.pretrained=false", "--set", "train.limit=32", "--set", "train.epochs=1",
         "--set", "train.batch_size=16", "--set", "train.eval_split=minitest"]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", TUTORIAL, flags=re.S)


def console_cases():
    for block in blocks("console"):
        parts = re.split(r"^\$ ", block, flags=re.M)[1:]
        for part in parts:
            command, _, output = part.partition("\n")
            yield command, output


def run(command: str, extra=()):
    argv = shlex.split(command.replace("\\\n", " "), comments=True)
    assert argv[0] == "python", command
    return subprocess.run([sys.executable, *argv[1:], *extra], cwd=ROOT, capture_output=True, text=True,
                          env=CHILD_ENV)


@pytest.mark.parametrize("command,expected", list(console_cases()))
def test_console_output_is_what_the_tutorial_shows(command, expected):
    r = run(command)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [l.rstrip() for l in r.stdout.splitlines()] == [l.rstrip() for l in expected.splitlines()]


BASH = [line for b in blocks("bash") for line in b.replace("\\\n", " ").splitlines()
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


def test_the_tutorial_has_commands():
    assert len(list(console_cases())) >= 2 and BASH


def python_blocks():
    """(block, the last repository file named before it: `model/x.py` or `lsrm.py`)."""
    for m in re.finditer(r"```python\n(.*?)```", TUTORIAL, flags=re.S):
        named = re.findall(r"`((?:model/\w+|lsrm)\.py)`", TUTORIAL[:m.start()])
        yield m.group(1), named[-1] if named else None


def occurs_verbatim(block: str, text: str) -> bool:
    """The block's lines, in order and consecutive, in text, all shifted right by the same indentation."""
    want = block.rstrip("\n").splitlines()
    lines = [line.rstrip() for line in text.splitlines()]
    for i in range(len(lines) - len(want) + 1):
        pad = len(lines[i]) - len(want[0])
        if pad >= 0 and all(lines[i + j] == " " * pad + w.rstrip() for j, w in enumerate(want)):
            return True
    return False


@pytest.mark.parametrize("block,file", list(python_blocks()))
def test_python_snippets_are_the_code(block, file):
    assert file is not None, f"no file named before the snippet:\n{block}"
    assert occurs_verbatim(block, (ROOT / file).read_text()), f"not in {file} as shown:\n{block}"

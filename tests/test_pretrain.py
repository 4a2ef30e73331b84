"""The committed tiny backbones (tiny_data/backbones/{vit,lm,lm_stepwise}.pt): the command that writes them is
deterministic, the committed files fit the tiny config and `train` uses them without pretraining, and a
file that is damaged or written for another config is never used silently."""
import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import CHILD_ENV

from model import config as C
from tiny_data import make_tiny_data as world
from tiny_data import pretrain as P
from model.tokenizer import WordTokenizer
from model.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = C.get_config("tiny")


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer(ROOT / TINY.train.tokenizer)


def test_pretraining_rows_hold_the_pictures_in_words_whole(tok):
    """A document longer than a row is dropped from the LM's pretraining (pack_documents): no picture
    question with its picture in words may be (at 128-token rows most were, and the oracle stayed low)."""
    docs = world.text_corpus(P.LM_RECIPE["seed"], 1500)
    pictures = [d for d in docs if d.startswith("Question: ") and ("Counts: " in d or "West to east: " in d)]
    assert len(pictures) > 400                                           # 35% of the documents
    assert max(len(tok.encode(d, bos=True, eos=True)) for d in docs) <= P.LM_RECIPE["seq_len"] + 1


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "lsrm.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=CHILD_ENV)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`lsrm.py pretrain --smoke` twice into two directories, at the same time (one thread each)."""
    outs = [tmp_path_factory.mktemp(f"backbones{i}") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda out: run("pretrain", "--smoke", "--threads", 1, "--out", out), outs))
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return outs, results


def test_pretrain_command_is_deterministic_and_prints_checksums(smoke):
    (a, b), (ra, rb) = smoke
    for name in P.FILES:
        da, db = (a / name).read_bytes(), (b / name).read_bytes()
        assert da == db                                            # same bytes, whatever the file's name
        assert f"sha256 {hashlib.sha256(da).hexdigest()}  {a / name}" in ra.stdout
    assert f"torch {torch.__version__}, 1 thread(s)" in ra.stdout


def test_smoke_files_load_with_their_recipe(smoke, tok):
    out = smoke[0][0]
    vit = P.read_backbone(out / "vit.pt", P.vit_fits(TINY, {**P.VIT_RECIPE, **P.SMOKE["vit"]}))
    lm = P.read_backbone(out / "lm.pt", P.llm_fits(TINY, tok, {**P.LM_RECIPE, **P.SMOKE["lm"]}))
    from tiny_data import stepwise as S
    stepwise = P.read_backbone(out / "lm_stepwise.pt", P.stepwise_fits(
        TINY, tok, {**P.LM_RECIPE, **P.SMOKE["lm"]},
        S.smoke_recipe(),
        {**S.READ_RECIPE, **S.READ_SMOKE}, {**P.VIT_RECIPE, **P.SMOKE["vit"]}, {**S.TEXT_RECIPE, **S.TEXT_SMOKE}))
    assert stepwise.keys() == lm.keys() and any(not torch.equal(stepwise[k], lm[k]) for k in lm)
    model = __import__("model.vlm", fromlist=["build"]).build(TINY)
    missing, unexpected = model.load_state_dict({**vit, **lm}, strict=False)
    assert not unexpected and all(".adapter." in k or k.startswith("memory.") for k in missing)


def test_only_the_step_wise_decoder_is_taught_from_the_files_there(smoke, tmp_path):
    """--only lm_stepwise.pt reads lm.pt and vit.pt from --out (same bytes as the full command's); without
    them it is a one-line error naming the missing file, and nothing is written."""
    a = smoke[0][0]
    for name in ("vit.pt", "lm.pt"):
        (tmp_path / name).write_bytes((a / name).read_bytes())
    r = run("pretrain", "--smoke", "--threads", 1, "--out", tmp_path, "--only", "lm_stepwise.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "lm_stepwise.pt").read_bytes() == (a / "lm_stepwise.pt").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("pretrain", "--smoke", "--threads", 1, "--out", empty, "--only", "lm_stepwise.pt")
    assert r.returncode != 0 and not list(empty.iterdir())
    assert r.stderr.strip().splitlines()[-1].endswith(
        f"{empty / 'lm.pt'}: missing or written for another recipe; the step-wise decoder is taught from it: "
        f"write it first (`python lsrm.py pretrain --smoke --only lm.pt`)")


def test_stage_7_alone_is_taught_to_a_decoder_written_before_it(smoke, tok, tmp_path):
    """--read-from FILE: stage 7 alone, on FILE's decoder (stages 1-6, its fits without "text"), the same
    tensors as text_llm on it in this process; a file that is not such a decoder is a one-line error naming it,
    and nothing is written."""
    from model.errors import WeightsError
    from tiny_data import stepwise as S
    a = smoke[0][0]
    blob = torch.load(a / "lm_stepwise.pt", map_location="cpu", weights_only=True)
    six = tmp_path / "six.pt"
    torch.save({**blob, "fits": {k: v for k, v in blob["fits"].items() if k != "text"}}, six)
    out = tmp_path / "out"
    r = run("pretrain", "--smoke", "--threads", 1, "--out", out, "--only", "lm_stepwise.pt", "--read-from", six)
    assert r.returncode == 0, r.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                        # as the command's --threads 1
    try:
        want = P.text_llm(TINY.llama, tok, blob["state"], lambda *_: None, {**S.TEXT_RECIPE, **S.TEXT_SMOKE})
    finally:
        torch.set_num_threads(threads)
    got = torch.load(out / "lm_stepwise.pt", map_location="cpu", weights_only=True)
    assert got["fits"] == blob["fits"] and all(torch.equal(got["state"][k].float(), want[k]) for k in want)
    assert any(not torch.equal(want[k], blob["state"][k].float()) for k in want)
    with pytest.raises(WeightsError, match=rf"^{a / 'lm_stepwise.pt'}: not a step-wise decoder of these recipes "
                                           r"before stage 7 \(written for another config, recipe or word list\)$"):
        P.write_backbones(TINY, tok, tmp_path / "none", smoke=True, log=lambda *_: None, only=("lm_stepwise.pt",),
                          read_from=a / "lm_stepwise.pt")        # it has stage 7's fits: not a stage-6 decoder
    assert not (tmp_path / "none").exists()


def test_committed_backbones_fit_the_tiny_config_and_need_no_pretraining(tok, monkeypatch, tmp_path):
    sizes = [(P.BACKBONES / n).stat().st_size for n in P.FILES]
    assert sum(sizes) <= 10 * 2 ** 20                               # the repository's limit: 10 MB together

    def no(*a, **k):
        raise AssertionError("pretrained although the committed backbones fit")
    monkeypatch.setattr(P, "pretrain_vit", no)
    monkeypatch.setattr(P, "pretrain_llm", no)
    lines = []
    state = P.pretrained_backbones(TINY, tok, cache_dir=tmp_path, log=lines.append)
    assert any(k.startswith("visual.") for k in state) and any(k.startswith("llama.") for k in state)
    assert lines == [f"ViT: the committed {P.BACKBONES / 'vit.pt'}", f"decoder: the committed {P.BACKBONES / 'lm.pt'}",
                     f"step-wise decoder: the committed {P.BACKBONES / 'lm_stepwise.pt'}"]     # tiny's decoder
    assert not list(tmp_path.iterdir())                             # nothing pretrained into the cache


def test_train_uses_the_committed_backbones(tmp_path):
    r = run("train", "--out", tmp_path / "run", "--set", "train.limit=32", "--set", "train.epochs=1",
            "--set", "train.batch_size=16", "--set", "train.eval_split=minitest", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the committed" in r.stdout and "pretraining" not in r.stdout


def test_a_file_for_another_config_is_not_used(smoke, tok, tmp_path, monkeypatch):
    out = smoke[0][0]                                   # smoke recipe: does not fit the real one
    monkeypatch.setattr(P, "pretrain_vit", lambda *a, **k: {"marker": torch.zeros(1)})
    lines = []
    state = P.pretrained_vit(TINY, cache_dir=tmp_path, log=lines.append, committed=out)
    assert set(state) == {"visual.marker"}                          # pretrained (stand-in), not the smoke file
    assert lines[0] == f"{out / 'vit.pt'} was written for another recipe: pretraining instead " \
                       f"(`python lsrm.py pretrain` rewrites it)"


def test_a_damaged_backbone_file_is_one_line_error(tmp_path):
    bad = tmp_path / "vit.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"vit\.pt: not a readable backbone file"):
        P.pretrained_vit(TINY, cache_dir=tmp_path / "cache", committed=tmp_path)

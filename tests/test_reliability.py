"""Faults and bad input a careful user meets, each a one-line error (exit status 2) or a note, and nothing lost:
outputs that cannot be written, one run per directory, --overwrite and --resume, NaN anywhere, checkpoints
used against another config or other data, odd images and data files, the remaining tracebacks.

Most cases run the command line in this process (`lsrm.main`), at smoke size with random frozen backbones;
the ones about another process (the lock, a kill) start one."""
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHILD_ENV
from PIL import Image

import lsrm
import model.train as T
from model import get_config
from model.checkpoint import load_checkpoint
from model.config import apply_overrides
from model.data import VLDataset, load_image, read_coco, read_scienceqa
from model.llama import Transformer
from model.rundir import hold_run_dir
from model.tokenizer import ByteTokenizer
from model.errors import CheckpointError, DataError, Diverged, UserError, WeightsError
from model.train import train
from model.vlm import build
from model.weights import load_llama

ROOT = Path(__file__).resolve().parents[1]
DATA, COCO = ROOT / "tiny_data" / "scienceqa", ROOT / "tiny_data" / "coco"
QUICK = ["--set", "train.pretrained=false", "--set", "train.limit=64", "--set", "train.epochs=1",
         "--set", "train.batch_size=16", "--set", "train.eval_split=minitest",
         "--set", "train.gen_tokens=16"]     # random backbones write to the limit: keep it short


def main(capsys, *args):
    """`python lsrm.py ARGS` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = lsrm.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *parts: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and all(p in err for p in parts)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished smoke run (4 steps): its checkpoint, log and a metrics.json."""
    out = tmp_path_factory.mktemp("run")
    r = subprocess.run([sys.executable, str(ROOT / "lsrm.py"), "train", "--out", str(out), *QUICK, "--no-eval"],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "metrics.json").write_text('{"split": "minitest"}')
    (out / "predictions.jsonl").write_text('{"id": "1"}\n')
    return out


def copy_scienceqa(dest: Path) -> Path:
    """The toy ScienceQA's JSON files, copied to be edited; the images linked, not copied."""
    dest.mkdir(parents=True)
    for name in ("problems.json", "pid_splits.json", "captions.json"):
        (dest / name).write_bytes((DATA / name).read_bytes())
    (dest / "images").symlink_to(DATA / "images")
    return dest


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A tmpfs mounted at `where` (read-only, or of a small size), or the test is skipped saying why."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or 'mount failed').strip()}); the simulated case "
                    f"beside this test covers the same code")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written in. Root ignores permissions, so as root: a read-only tmpfs."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    with tmpfs(tmp_path / "ro", "ro,size=1m") as d:
        yield d


# ---------------------------------------------------------------------------------------------
# Outputs that cannot be written: refused before any work; a full disk keeps the last checkpoint

def test_outputs_in_a_read_only_directory_are_refused_before_any_work(read_only_dir, run_dir, capsys):
    ckpt = run_dir / "checkpoint.pt"
    for args in (["train", "--out", read_only_dir / "run", *QUICK],
                 ["eval", "--ckpt", ckpt, "--split", "minitest", "--out", read_only_dir / "m.json"],
                 ["visualize", "--ckpt", ckpt, "--out", read_only_dir / "figures"]):
        code, out, err = main(capsys, *args)
        assert code == 2 and one_line(err, str(read_only_dir), "cannot write"), err
        assert out == ""                                    # refused before any work: nothing evaluated or drawn
    assert list(read_only_dir.iterdir()) == []


def test_an_unwritable_directory_is_refused_before_any_work_simulated(tmp_path, monkeypatch, capsys):
    """The same check without a read-only filesystem: the probe file cannot be made."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr("model.rundir.tempfile.TemporaryFile", refuse)
    code, out, err = main(capsys, "train", "--out", tmp_path / "run", *QUICK)
    assert code == 2 and one_line(err, f"cannot write in {tmp_path}", "Read-only file system") and out == ""
    assert not (tmp_path / "run").exists()


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(tmp_path, run_dir, capsys):
    """A tmpfs that holds one checkpoint but not a second beside it (a checkpoint is written whole, then renamed)."""
    size = (run_dir / "checkpoint.pt").stat().st_size
    with tmpfs(tmp_path / "small", f"size={size * 3 // 2 // 4096 * 4096}") as disk:
        out = disk / "run"
        code, _, err = main(capsys, "train", "--out", out, *QUICK, "--set", "train.ckpt_every=1", "--no-eval")
        assert code == 2, err
        assert one_line(err, f"{out / 'checkpoint.pt'}: cannot be written at step 2 (No space left on device)",
                        "(step 1), is intact", "--resume")
        assert load_checkpoint(out / "checkpoint.pt")["step"] == 1
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl"]   # no temporary, no lock


def test_a_full_disk_at_a_checkpoint_simulated(tmp_path, monkeypatch):
    ds, cfg = tiny_training()
    real, calls = T.atomic_save, []

    def disk_full_the_second_time(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, path)
    monkeypatch.setattr("model.train.atomic_save", disk_full_the_second_time)
    with pytest.raises(CheckpointError) as e:
        train(apply_overrides(cfg, ["train.ckpt_every=1"]), fresh(cfg), ds, tmp_path, log=lambda s: None)
    assert str(e.value).startswith(f"{tmp_path / 'checkpoint.pt'}: cannot be written at step 2 (No space left")
    assert "(step 1), is intact" in str(e.value) and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


def test_a_results_file_that_cannot_be_written_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    (tmp_path / "m.json").write_text('{"old": 1}')              # an earlier evaluation's results
    monkeypatch.setattr(Path, "write_text", disk_full)
    code, out, err = main(capsys, "eval", "--ckpt", run_dir / "checkpoint.pt", "--split", "minitest", "--no-bounds",
                          "--out", tmp_path / "m.json")
    assert code == 2 and one_line(err, f"{tmp_path / 'm.json'}: cannot be written (No space left on device)")
    assert "Avg" in out                                     # the results were printed before
    assert (tmp_path / "m.json").read_bytes() == b'{"old": 1}' and os.listdir(tmp_path) == ["m.json"]   # kept whole


# ---------------------------------------------------------------------------------------------
# One run per directory

def test_a_second_run_into_a_held_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    notes = []
    with hold_run_dir(out, notes.append):
        assert (out / "lock").read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
        with pytest.raises(UserError, match=f"{out} is in use by another run \\(pid {os.getpid()} on "):
            with hold_run_dir(out):
                pass
    assert not out.exists() and notes == []                 # made for nothing, left as it was
    out.mkdir()
    (out / "lock").write_text("pid 999999999 on elsewhere\n")        # a run killed (-9) left its lock file
    with hold_run_dir(out, notes.append):
        pass
    assert notes == [f"note: {out / 'lock'}: taking over the lock of a run that is gone (pid 999999999 on elsewhere)"]
    assert list(out.iterdir()) == []


def test_a_filesystem_without_locks_runs_unguarded_with_a_note(tmp_path, monkeypatch):
    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr("model.rundir.fcntl.flock", no_locks)
    notes = []
    with hold_run_dir(tmp_path / "run", notes.append):
        assert (tmp_path / "run" / "lock").is_file()
    assert notes == [f"note: {tmp_path / 'run' / 'lock'} cannot be locked here (No locks available): a second run "
                     f"into {tmp_path / 'run'} would not be refused"]


def test_two_train_commands_into_one_directory(tmp_path, capsys):
    """Run A holds its directory: run B is refused in one line; A killed (-9), its stale lock is taken over."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "lsrm.py"), "train", "--out", str(out), *QUICK, "--set", "train.epochs=200",
            "--set", "train.ckpt_every=1", "--set", "train.workers=2", "--no-eval"]   # workers: forks sharing the lock
    a = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**CHILD_ENV, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        while not (line := a.stdout.readline()).startswith("step"):          # A is training
            assert line, a.stderr.read()[-2000:]
        while not (out / "checkpoint.pt").exists():                          # and has a checkpoint
            assert a.poll() is None, a.stderr.read()[-2000:]
            time.sleep(0.05)
        code, out_b, err = main(capsys, "train", "--out", out, *QUICK, "--overwrite")
        assert code == 2 and one_line(err, f"{out} is in use by another run (pid {a.pid} on ") and out_b == ""
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):      # A's workers too: orphans of a killed run live on
            os.killpg(a.pid, signal.SIGKILL)
        a.stdout.close()
        a.stderr.close()
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    code, out_b, err = main(capsys, "train", "--out", out, *QUICK, "--set", "train.epochs=200",
                            "--set", "train.ckpt_every=1", "--no-eval", "--resume", "--stop-after", step + 1)
    assert code == 0, err
    assert f"taking over the lock of a run that is gone (pid {a.pid} on " in out_b
    assert [json.loads(s)["step"] for s in (out / "log.jsonl").read_text().splitlines()] == list(range(1, step + 2))
    assert not (out / "lock").exists()


def test_only_rank_0_holds_the_directory(tmp_path, monkeypatch, capsys):
    """Under torchrun the other ranks share rank 0's directory: they neither take the lock nor are refused by it."""
    ran = []
    monkeypatch.setattr(lsrm, "train_in", lambda out, args, cfg, data, rank, *a: ran.append(rank))
    out = tmp_path / "run"
    with hold_run_dir(out):                                  # rank 0 of this run holds it
        monkeypatch.setattr(lsrm, "distributed", lambda: (1, 2))
        assert main(capsys, "train", "--out", out, *QUICK)[0] == 0 and ran == [1]
        monkeypatch.setattr(lsrm, "distributed", lambda: (0, 2))
        code, _, err = main(capsys, "train", "--out", out, *QUICK)
        assert code == 2 and "in use by another run" in err and ran == [1]


# ---------------------------------------------------------------------------------------------
# --overwrite and --resume

def tiny_training():
    tok = ByteTokenizer()
    ds = VLDataset(read_scienceqa(DATA, "train")[:16], tok, 32, "clip", 512)
    cfg = apply_overrides(get_config("tiny"), ["train.epochs=1", "train.batch_size=4", "train.micro_batch=4"])
    return ds, cfg


def fresh(cfg):
    torch.manual_seed(0)
    return build(cfg)


def steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_overwrite_removes_the_old_run(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "log.jsonl", "metrics.json", "predictions.jsonl"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    code, _, err = main(capsys, "train", "--out", out, *QUICK, "--overwrite", "--no-eval", "--stop-after", 1)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl"] and steps(out) == [1]


def test_overwrite_killed_before_its_first_checkpoint_leaves_nothing_of_the_old_run(run_dir, tmp_path):
    class Killed(BaseException):
        pass
    ds, cfg = tiny_training()
    cfg.train.workers = 0                  # the kill below is raised in this process, as a real one would be
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "log.jsonl", "metrics.json", "predictions.jsonl"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    batches, col = [], ds.collate

    def dies_at_the_second_step(items):
        batches.append(1)
        if len(batches) == 2:
            raise Killed
        return col(items)
    ds.collate = dies_at_the_second_step
    with pytest.raises(Killed):
        train(cfg, fresh(cfg), ds, out, log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"] and steps(out) == [1]


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    ds, cfg = tiny_training()
    train(cfg, fresh(cfg), ds, tmp_path, stop_after=2, log=lambda s: None)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')                   # a power cut in the middle of a line
    notes = []
    train(cfg, fresh(cfg), ds, tmp_path, resume=True, stop_after=3, log=notes.append)
    assert steps(tmp_path) == [1, 2, 3]
    assert any(n.startswith(f"note: {tmp_path / 'log.jsonl'}: its last line was cut short") for n in notes)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    (tmp_path / "log.jsonl").write_text("\n".join([lines[0], "\0\0\0", *lines[1:]]) + "\n")   # damage elsewhere
    with pytest.raises(CheckpointError, match=r"log\.jsonl: line 2 is not a log record"):
        train(cfg, fresh(cfg), ds, tmp_path, resume=True, stop_after=4, log=lambda s: None)


def test_resume_of_a_finished_run_says_so(run_dir, capsys):
    metrics = (run_dir / "metrics.json").read_text()
    code, out, err = main(capsys, "train", "--out", run_dir, *QUICK, "--resume")
    assert code == 2 and one_line(err, f"{run_dir} holds a finished run (step 4, epoch 1/1)", "eval --ckpt")
    assert (run_dir / "metrics.json").read_text() == metrics and out == ""


def test_resume_refuses_other_data_but_not_another_spelling_of_its_path(tmp_path, monkeypatch, capsys):
    data = copy_scienceqa(tmp_path / "sqa")
    out = tmp_path / "run"
    args = ["train", "--out", out, *QUICK, "--no-eval"]
    assert main(capsys, *args, "--set", f"train.data={data}", "--stop-after", 1)[0] == 0
    monkeypatch.chdir(tmp_path)                            # the same data, spelled relative, and logged more often
    code, _, err = main(capsys, *args, "--set", "train.data=sqa", "--set", "train.log_every=1", "--resume",
                        "--stop-after", 2)
    assert code == 0, err
    edit_json(data / "problems.json", lambda d: [p.update(answer=len(p["choices"]) - 1 - p["answer"])
                                                 for p in d.values()])            # answers flipped, same path
    code, out_, err = main(capsys, *args, "--set", f"train.data={data}", "--resume")
    assert code == 2 and one_line(err, f"{out / 'checkpoint.pt'}: trained on other data: problems.json / "
                                       f"pid_splits.json changed since") and out_ == ""
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)                 # a checkpoint from before fingerprints
    del ckpt["data"]
    torch.save(ckpt, out / "checkpoint.pt")
    code, out_, err = main(capsys, *args, "--set", f"train.data={data}", "--resume", "--stop-after", 3)
    assert code == 0 and "records no fingerprint of its training data (an older checkpoint)" in out_


# ---------------------------------------------------------------------------------------------
# NaN: in the config, the frozen weights, the loss, a checkpoint

BAD_CONFIG = {
    "train.base_lr=nan": "train.base_lr must be a finite number, got nan",
    "train.weight_decay=nan": "train.weight_decay must be a finite number, got nan",
    "lsrm.fusion_scale=inf": "lsrm.fusion_scale must be a finite number, got inf",
    "train.base_lr=-0.1": "train.base_lr must be >= 0, got -0.1",
    "train.warmup_epochs=-1": "train.warmup_epochs must be >= 0, got -1.0",
    "train.beta2=1.5": "train.beta2 must be in [0, 1), got 1.5",
    "lsrm.dropout=1.5": "lsrm.dropout must be in [0, 1], got 1.5",
    "train.eval_batch=0": "train.eval_batch must be >= 1, got 0",
    "lsrm=3": "'lsrm' is a group of options, not one; set one of: lsrm.n_slots, lsrm.taps,",
    "train.max_len=600": "train.max_len=600 is more than llama.max_seq_len=512, the longest sequence the decoder",
}


@pytest.mark.parametrize("override", list(BAD_CONFIG))
def test_bad_config_values_name_the_field_up_front(override, tmp_path, capsys):
    code, out, err = main(capsys, "train", "--out", tmp_path / "run", "--set", override)
    assert code == 2 and one_line(err, BAD_CONFIG[override]) and out == "" and not (tmp_path / "run").exists()


def meta_copy_of_the_tiny_decoder(d: Path, poison: str | None = None) -> Path:
    """The tiny decoder (random weights) as a Meta checkpoint directory, one tensor optionally NaN."""
    c = get_config("tiny").llama
    torch.manual_seed(0)
    sd = Transformer(c).state_dict()
    if poison:
        sd[poison][0, 0] = float("nan")
    d.mkdir()
    (d / "params.json").write_text(json.dumps(dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                                                   n_kv_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                                                   multiple_of=c.multiple_of, norm_eps=c.norm_eps,
                                                   max_seq_len=c.max_seq_len)))
    torch.save(sd, d / "consolidated.00.pth")
    return d


def test_non_finite_frozen_weights_are_refused_at_load(tmp_path, capsys):
    d = meta_copy_of_the_tiny_decoder(tmp_path / "llama", poison="layers.2.feed_forward.w3.weight")
    with pytest.raises(WeightsError, match=r"consolidated\.00\.pth: 'layers\.2\.feed_forward\.w3\.weight' holds "
                                           r"NaN or inf \(as float32\)"):
        load_llama(Transformer(get_config("tiny").llama), d)
    code, out, err = main(capsys, "train", "--out", tmp_path / "run", *QUICK, "--set", f"train.llm_weights={d}")
    assert code == 2 and one_line(err, "consolidated.00.pth", "layers.2.feed_forward.w3.weight", "NaN")
    assert not any(line.startswith("step ") for line in out.splitlines())       # no training step was taken
    # the tiny backbones' own files likewise
    from tiny_data.pretrain import BACKBONES, llm_fits, read_backbone
    blob = torch.load(BACKBONES / "lm.pt", weights_only=True)
    blob["state"]["llama.norm.weight"][3] = float("inf")
    torch.save(blob, tmp_path / "lm.pt")
    cfg = get_config("tiny")
    from model.assemble import make_tokenizer
    with pytest.raises(WeightsError, match=r"lm\.pt: 'llama\.norm\.weight' holds NaN or inf"):
        read_backbone(tmp_path / "lm.pt", llm_fits(cfg, make_tokenizer(cfg)))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    ds, cfg = tiny_training()
    cfg = apply_overrides(cfg, ["train.ckpt_every=1"])
    real, calls = T.answer_loss_sum, []

    def nan_at_step_3(logits, targets):
        calls.append(1)
        loss = real(logits, targets)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(T, "answer_loss_sum", nan_at_step_3)
    with pytest.raises(Diverged) as e:
        train(cfg, fresh(cfg), ds, tmp_path, log=lambda s: None)
    assert str(e.value) == (f"step 3: the loss is nan: training stopped; the last checkpoint, "
                            f"{tmp_path / 'checkpoint.pt'} (step 2), is intact")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2 and steps(tmp_path) == [1, 2]


def test_a_diverging_run_stops_in_one_line(tmp_path, capsys):
    """A learning rate far too high: the adapters overflow after a step or two; the run stops, exit status 2."""
    out = tmp_path / "run"
    code, stdout, err = main(capsys, "train", "--out", out, *QUICK, "--set", "train.base_lr=1e36",
                             "--set", "train.warmup_epochs=0", "--set", "train.ckpt_every=1", "--no-eval")
    assert code == 2 and one_line(err, "training stopped", "NaN" if "holds" in err else "the loss is"), err
    saved = load_checkpoint(out / "checkpoint.pt") if (out / "checkpoint.pt").exists() else None
    assert saved is None or all(torch.isfinite(v).all() for v in saved["adapters"].values())
    assert "Avg" not in stdout


def test_eval_refuses_a_checkpoint_with_non_finite_adapters(run_dir, tmp_path, capsys):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    name = sorted(ckpt["adapters"])[0]
    ckpt["adapters"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    code, out, err = main(capsys, "eval", "--ckpt", tmp_path / "checkpoint.pt", "--split", "minitest")
    assert code == 2 and one_line(err, f"{tmp_path / 'checkpoint.pt'}: {name} holds NaN or inf") and out == ""


# ---------------------------------------------------------------------------------------------
# A checkpoint used against another config: refused before anything is built

@pytest.mark.parametrize("command", ["eval", "generate", "visualize"])
@pytest.mark.parametrize("override", ["train.pretrained=true", "lsrm.taps=0,1", "llama.dim=256",
                                      "lsrm.feature_scale=1"])
def test_eval_time_overrides_of_what_the_adapters_were_trained_against_are_refused(command, override, run_dir,
                                                                                   monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("a model was built")
    monkeypatch.setattr("model.assemble.model_from_config", never)
    key = override.split("=")[0]
    extra = {"eval": ["--split", "minitest"], "generate": ["--prompt", "x"], "visualize": []}[command]
    code, out, err = main(capsys, command, "--ckpt", run_dir / "checkpoint.pt", "--set", override, *extra)
    assert code == 2 and one_line(err, "checkpoint.pt: --set ", f"{key}=", "different config", f"({key}=") and out == ""


def test_other_frozen_backbones_are_warned_about_in_every_command(run_dir, tmp_path, capsys):
    image = next((DATA / "images" / "test").glob("*/image.png"))
    for args in (["generate", "--prompt", "x", "--max-new-tokens", 2],
                 ["visualize", "--image", image, "--prompt", "x", "--out", tmp_path]):
        code, out, err = main(capsys, args[0], "--ckpt", run_dir / "checkpoint.pt", "--set", "train.seed=7", *args[1:])
        assert code == 0 and "was trained on different frozen backbones" in err and "warning" not in out


# ---------------------------------------------------------------------------------------------
# Images and data files

def test_a_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (40, 48)).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
    Image.fromarray(np.round(a16 * (255 / 65535)).astype(np.uint8)).save(tmp_path / "g8.png")
    for mode in ("clip", "squash"):
        assert torch.equal(load_image(tmp_path / "g16.png", 32, mode), load_image(tmp_path / "g8.png", 32, mode))
    Image.fromarray(a16.astype(np.int32) * 1000).save(tmp_path / "i32.tif")
    with pytest.raises(DataError, match=r"i32\.tif: 32-bit integer pixels \(mode I\) are not read"):
        load_image(tmp_path / "i32.tif", 32)


def test_scienceqa_files_accepted_silently_before(tmp_path):
    root = copy_scienceqa(tmp_path / "sqa")
    edit_json(root / "pid_splits.json", lambda d: d.update(train=d["train"][:5] + [d["train"][0]] * 40))
    with pytest.raises(DataError, match=rf"pid_splits\.json: split 'train' lists pid '{read_pid(root)}' 41 times"):
        read_scienceqa(root, "train")
    root = copy_scienceqa(tmp_path / "sqa2")
    captions = json.loads((root / "captions.json").read_text())["captions"]
    pid = next(iter(captions))
    edit_json(root / "captions.json", lambda d: d["captions"].update({pid: 7}))
    with pytest.raises(DataError, match=rf"captions\.json: the caption of pid '{pid}' is 7, not text"):
        read_scienceqa(root, "train", captions=True)
    test_pids = json.loads((root / "pid_splits.json").read_text())["test"]
    edit_json(root / "captions.json", lambda d: [d["captions"].pop(p, None) for p in [pid, *test_pids[10:]]])
    notes = []
    examples = read_scienceqa(root, "test", captions=True, log=notes.append)
    pictures = [e for e in examples if e.image is not None]
    captions = json.loads((root / "captions.json").read_text())["captions"]
    missing = sum(e.id not in captions for e in pictures)
    assert missing > len(pictures) // 2
    assert notes == [f"note: {missing} of {len(pictures)} picture items of split 'test' have no caption in "
                     f"{root / 'captions.json'}: their context has none"]


def read_pid(root):
    return json.loads((root / "pid_splits.json").read_text())["train"][0]


def coco_copy(dest: Path, edit) -> Path:
    dest.mkdir()
    for d in ("train2014", "val2014"):
        (dest / d).symlink_to(COCO / d)
    data = json.loads((COCO / "dataset_coco.json").read_text())
    edit(data["images"])
    (dest / "dataset_coco.json").write_text(json.dumps(data))
    return dest


def test_coco_files_accepted_silently_or_with_a_traceback_before(tmp_path):
    def blank(images):
        train = [im for im in images if im["split"] == "train"]
        train[0]["sentences"][1]["raw"] = "   "
        train[1]["sentences"][0]["raw"] = ""
    root = coco_copy(tmp_path / "blank", blank)
    notes = []
    examples = read_coco(root, "train", log=notes.append)
    assert all(e.target.strip() for e in examples)
    assert notes == [f"note: 2 captions of the train images in {root / 'dataset_coco.json'} are empty (only spaces): "
                     f"left out"]
    root = coco_copy(tmp_path / "null", lambda images: images[0].update(filepath=None))
    with pytest.raises(DataError, match=r"dataset_coco\.json: image \d+ has filepath None and filename"):
        read_coco(root, "train")
    for typo, was in (("vla", "val"), ("trian", "train")):    # "trian" alone would leave restval to train on
        root = coco_copy(tmp_path / typo, lambda images: [im.update(split=typo) for im in images
                                                          if im["split"] == was])
        for split in ("train", "val"):
            with pytest.raises(DataError, match=rf"dataset_coco\.json: images\[\d+\] has split '{typo}'; "
                                                r"Karpathy's splits are restval, test, train, val$"):
                read_coco(root, split)
    root = coco_copy(tmp_path / "none", lambda images: [im.update(split="test") for im in images
                                                        if im["split"] == "val"])
    with pytest.raises(DataError, match=r"dataset_coco\.json: no image has split val; the splits found: "
                                        r"restval, test, train$"):
        read_coco(root, "val")


# ---------------------------------------------------------------------------------------------
# Tracebacks and unclear lines left from before

def test_log_every_0_is_off(tmp_path, capsys):
    code, out, err = main(capsys, "train", "--out", tmp_path / "run", *QUICK, "--set", "train.log_every=0",
                          "--no-eval")
    assert code == 0, err
    assert [line.split("|")[0].strip() for line in out.splitlines() if line.startswith("step")] == \
        ["step     1/4", "step     4/4"]                   # the first step and the last, as with any log_every


def test_a_missing_optional_package_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tokenizers", None)         # import tokenizers: ImportError
    (tmp_path / "tokenizer.json").write_text("{}")
    code, out, err = main(capsys, "train", "--out", tmp_path / "a", *QUICK, "--set",
                          f"train.tokenizer={tmp_path / 'tokenizer.json'}")
    assert code == 2 and one_line(err, "tokenizer.json", "needs the `tokenizers` package: pip install tokenizers")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")     # a valid, empty safetensors file
    code, out, err = main(capsys, "train", "--out", tmp_path / "b", *QUICK, "--set", f"train.llm_weights={hf}")
    assert code == 2 and one_line(err, f"reading {hf / 'model.safetensors'} needs the `safetensors` package: "
                                       f"pip install safetensors")


def test_paths_of_the_wrong_kind_are_named(run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for args, message in [
            (["visualize", "--ckpt", run_dir / "checkpoint.pt", "--out", tmp_path / "file"],
             f"--out {tmp_path / 'file'}: a file, not a directory (the PNGs are written into it)"),
            (["eval", "--ckpt", run_dir], f"--ckpt {run_dir}: a directory; did you mean {run_dir / 'checkpoint.pt'}?"),
            (["generate", "--ckpt", run_dir / "checkpoint.pt", "--prompt", "x", "--image", tmp_path],
             f"--image {tmp_path}: a directory, not an image file")]:
        code, out, err = main(capsys, *args)
        assert code == 2 and err == f"error: {message}\n" and out == ""

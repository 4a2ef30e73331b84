"""The training loop: recipe, exact resume, 2-process DDP equal to 1 process, checkpoint checks."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import get_config
from model.config import apply_overrides
from model.data import VLDataset, collate, read_scienceqa
from model.tokenizer import ByteTokenizer
from model.train import (CheckpointError, get_lr, load_adapters, load_checkpoint, make_optimizer, train,
                         write_atomically)
from model.vlm import adapter_state_dict, build

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tiny_data" / "scienceqa"


def small_cfg(*overrides):
    return apply_overrides(get_config("tiny"), ["train.epochs=2", "train.batch_size=8", "train.micro_batch=4",
                                                "train.warmup_epochs=0.5", "lsrm.shift_epoch=1", *overrides])


@pytest.fixture(scope="module")
def dataset():
    tok = ByteTokenizer()
    examples = read_scienceqa(DATA, "train")[:40]
    return VLDataset(examples, tok, 32, "clip", 512), (lambda items: collate(items, tok.pad_id))


def fresh_model(cfg, seed=0):
    torch.manual_seed(seed)
    return build(cfg)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def test_lr_schedule():
    cfg = small_cfg()
    peak = cfg.train.base_lr * 8 / 256
    assert get_lr(0, cfg) == 0 and math.isclose(get_lr(0.25, cfg), peak / 2)
    assert math.isclose(get_lr(0.5, cfg), peak) and get_lr(2.0, cfg) < 1e-12
    lrs = [get_lr(e / 10, cfg) for e in range(5, 21)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))                      # cosine: non-increasing


def test_weight_decay_groups():
    model = build(get_config("tiny"))
    opt = make_optimizer(model, get_config("tiny"))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(names[id(p)].endswith("Lambda") for p in no_decay["params"])
    assert any(names[id(p)].endswith("fc1.bias") for p in no_decay["params"])


def test_loss_only_on_answer_and_adapters_move(dataset, tmp_path):
    ds, col = dataset
    cfg = small_cfg("train.epochs=1")
    model = fresh_model(cfg)
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    summary = train(cfg, model, ds, col, tmp_path, log=lambda s: None)
    assert summary["step"] == 5 and math.isfinite(summary["loss"])
    after = adapter_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_resume_continues_exactly(dataset, tmp_path):
    """An interrupted run resumed from its checkpoint gives the same loss sequence as one that never stopped."""
    ds, col = dataset
    cfg = small_cfg()
    train(cfg, fresh_model(cfg), ds, col, tmp_path / "whole", log=lambda s: None)
    part = tmp_path / "part"
    s = train(cfg, fresh_model(cfg), ds, col, part, stop_after=3, log=lambda s: None)
    assert s["step"] == 3 and (part / "checkpoint.pt").is_file()
    resumed = fresh_model(cfg)                     # the same frozen backbones; adapters scrambled
    with torch.no_grad():
        for p in adapter_state_dict(resumed).values():
            p.normal_()
    train(cfg, resumed, ds, col, part, resume=True, log=lambda s: None)
    assert losses(part) == losses(tmp_path / "whole") and len(losses(part)) == 10
    a = load_checkpoint(part / "checkpoint.pt")["adapters"]
    b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["adapters"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_m_is_applied_from_shift_epoch_as_model_state_the_checkpoint_records(dataset, tmp_path):
    ds, col = dataset
    cfg = small_cfg()                                     # 2 epochs of 5 steps; M applied from epoch 1
    model = fresh_model(cfg)
    train(cfg, model, ds, col, tmp_path, stop_after=5, log=lambda s: None)
    assert not model.inheriting and not load_checkpoint(tmp_path / "checkpoint.pt")["inheritable_used"]
    train(cfg, model, ds, col, tmp_path, resume=True, stop_after=6, log=lambda s: None)
    assert model.inheriting and load_checkpoint(tmp_path / "checkpoint.pt")["inheritable_used"]


def test_resume_refuses_a_different_config(dataset, tmp_path):
    ds, col = dataset
    cfg = small_cfg()
    train(cfg, fresh_model(cfg), ds, col, tmp_path, stop_after=1, log=lambda s: None)
    other = small_cfg("lsrm.delta=0.5")
    with pytest.raises(CheckpointError, match="lsrm.delta"):
        train(other, fresh_model(other), ds, col, tmp_path, resume=True, log=lambda s: None)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    cfg = get_config("tiny")
    ckpt = {"adapters": adapter_state_dict(build(apply_overrides(get_config("tiny"), ["lsrm.n_slots=96"])))}
    with pytest.raises(CheckpointError, match="different config"):
        load_adapters(build(cfg), ckpt, tmp_path / "x.pt")


def test_checkpoint_is_written_atomically(dataset, tmp_path):
    ds, col = dataset
    cfg = small_cfg("train.epochs=1")
    train(cfg, fresh_model(cfg), ds, col, tmp_path, log=lambda s: None)
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 5 and set(ckpt["adapters"]) == set(adapter_state_dict(build(cfg)))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("the old run")

    def disk_full(tmp):
        tmp.write_text("half a fil")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(path, disk_full)
    assert path.read_text() == "the old run" and list(tmp_path.iterdir()) == [path]


DDP_ARGS = ["--set", "train.limit=32", "--set", "train.epochs=1", "--set", "train.batch_size=16",
            "--set", "train.micro_batch=4", "--set", "lsrm.dropout=0", "--set", "vit.adapter_dropout=0",
            "--set", "lsrm.shift_epoch=0", "--set", "train.warmup_epochs=0.5", "--set", "train.pretrained=false",
            "--no-eval"]


# a port taken between torchrun choosing it and a worker binding it, or a peer gone before connecting
SOCKET_TROUBLE = re.compile(r"EADDRINUSE|Address already in use|Connection (refused|reset by peer)|"
                            r"failed to listen|RendezvousConnectionError")


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains the same adapters as 1 process with the same global batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "lsrm.py", "train", "--out", str(tmp_path / "one"), *DDP_ARGS],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    for attempt in range(2):              # once more only if the failure is the sockets', not the training's
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "lsrm.py", "train", "--out", str(tmp_path / "two"), *DDP_ARGS],
                             cwd=ROOT, capture_output=True, text=True, env=env)
        if two.returncode == 0 or not SOCKET_TROUBLE.search(two.stderr):
            break
    assert two.returncode == 0, two.stderr[:1500] + "\n...\n" + two.stderr[-2500:]
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")["adapters"]
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["adapters"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)

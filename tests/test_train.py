"""The training loop: recipe, exact resume, 2-process DDP equal to 1 process, checkpoint checks."""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from model import get_config
from model import train as train_module
from model.config import apply_overrides
from model.checkpoint import load_adapters, load_checkpoint, write_atomically
from model.data import VLDataset, read_scienceqa
from model.errors import CheckpointError, DataError
from model.tokenizer import ByteTokenizer
from model.train import (StepSampler, StopOnInterrupt, autocast, batch_indices, check_precision, ddp_wrap,
                         distributed, get_lr, make_optimizer, rng_states, set_rng_states, train)
from model.vlm import adapter_state_dict, build, cast_frozen

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tiny_data" / "scienceqa"


def small_cfg(*overrides):
    return apply_overrides(get_config("tiny"), ["train.epochs=2", "train.batch_size=8", "train.micro_batch=4",
                                                "train.warmup_epochs=0.5", "lsrm.shift_epoch=1", *overrides])


@pytest.fixture(scope="module")
def dataset():
    tok = ByteTokenizer()
    examples = read_scienceqa(DATA, "train")[:40]
    return VLDataset(examples, tok, 32, "clip", 512)


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
    ds = dataset
    cfg = small_cfg("train.epochs=1")
    model = fresh_model(cfg)
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    summary = train(cfg, model, ds, tmp_path, log=lambda s: None)
    assert summary["step"] == 5 and math.isfinite(summary["loss"])
    after = adapter_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_resume_continues_exactly(dataset, tmp_path):
    """An interrupted run resumed from its checkpoint gives the same loss sequence as one that never stopped."""
    ds = dataset
    cfg = small_cfg()
    train(cfg, fresh_model(cfg), ds, tmp_path / "whole", log=lambda s: None)
    part = tmp_path / "part"
    s = train(cfg, fresh_model(cfg), ds, part, stop_after=3, log=lambda s: None)
    assert s["step"] == 3 and (part / "checkpoint.pt").is_file()
    resumed = fresh_model(cfg)                     # the same frozen backbones; adapters scrambled
    with torch.no_grad():
        for p in adapter_state_dict(resumed).values():
            p.normal_()
    train(cfg, resumed, ds, part, resume=True, log=lambda s: None)
    assert losses(part) == losses(tmp_path / "whole") and len(losses(part)) == 10
    a = load_checkpoint(part / "checkpoint.pt")["adapters"]
    b = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["adapters"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_m_is_applied_from_shift_epoch_as_model_state_the_checkpoint_records(dataset, tmp_path):
    ds = dataset
    cfg = small_cfg()                                     # 2 epochs of 5 steps; M applied from epoch 1
    model = fresh_model(cfg)
    train(cfg, model, ds, tmp_path, stop_after=5, log=lambda s: None)
    assert not model.inheritable and not load_checkpoint(tmp_path / "checkpoint.pt")["inheritable"]
    train(cfg, model, ds, tmp_path, resume=True, stop_after=6, log=lambda s: None)
    assert model.inheritable and load_checkpoint(tmp_path / "checkpoint.pt")["inheritable"]


def test_a_checkpoint_that_named_the_m_switch_inheritable_used_still_loads(dataset, tmp_path):
    """Checkpoints written before the switch had one name recorded it as "inheritable_used": it is read as
    "inheritable", restored by model_from_checkpoint, and the run resumes from it."""
    from model.assemble import model_from_checkpoint
    cfg = small_cfg()
    train(cfg, fresh_model(cfg), dataset, tmp_path, stop_after=6, log=lambda s: None)       # M applied at step 6
    path = tmp_path / "checkpoint.pt"
    old = torch.load(path, weights_only=True)
    old["inheritable_used"] = old.pop("inheritable")
    torch.save(old, path)
    ckpt = load_checkpoint(path)
    assert ckpt["inheritable"] is True and "inheritable_used" not in ckpt
    _, model, _, _ = model_from_checkpoint(str(path), torch.device("cpu"), log=lambda *a: None)
    assert model.inheritable
    summary = train(cfg, fresh_model(cfg), dataset, tmp_path, resume=True, log=lambda s: None)
    assert summary["step"] == 10 and load_checkpoint(path)["inheritable"]


def test_resume_refuses_a_different_config(dataset, tmp_path):
    ds = dataset
    cfg = small_cfg()
    train(cfg, fresh_model(cfg), ds, tmp_path, stop_after=1, log=lambda s: None)
    other = small_cfg("lsrm.delta=0.5")
    with pytest.raises(CheckpointError, match="lsrm.delta"):
        train(other, fresh_model(other), ds, tmp_path, resume=True, log=lambda s: None)


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
    ds = dataset
    cfg = small_cfg("train.epochs=1")
    train(cfg, fresh_model(cfg), ds, tmp_path, log=lambda s: None)
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
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    b = two["adapters"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)
    states = two["rng_states"]                          # each process's own random state, seeded apart
    assert len(states) == 2 and not torch.equal(states[0]["cpu"], states[1]["cpu"])


def torchrun(args, cwd, env, script="lsrm.py"):
    for attempt in range(2):              # once more only if the failure is the sockets', not the training's
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            script, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env)
        if r.returncode == 0 or not SOCKET_TROUBLE.search(r.stderr):
            break
    return r


NODE = """import os, runpy, sys
os.chdir(os.path.join(sys.argv[1], "node" + os.environ["LOCAL_RANK"]))   # each process in a directory of its own
sys.path.insert(0, {root!r})
sys.argv = [{lsrm!r}] + sys.argv[2:]
runpy.run_path({lsrm!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_two_nodes_without_a_shared_filesystem(tmp_path):
    """Each process sees its own directory (as two nodes without a shared filesystem would): --out is relative,
    so only rank 0's exists. Rank 0 alone checks, writes and reads the run (--resume included) and evaluates;
    the other never touches its --out, waits for the evaluation, and both exit 0 together."""
    (tmp_path / "node0").mkdir(), (tmp_path / "node1").mkdir()
    (tmp_path / "node.py").write_text(NODE.format(root=str(ROOT), lsrm=str(ROOT / "lsrm.py")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [tmp_path, "train", "--out", "run", *DDP_ARGS[:-1], "--set", "train.eval_split=minitest",
            "--set", "train.gen_tokens=16"]
    r = torchrun([*args, "--no-eval", "--stop-after", 1], tmp_path, env, script=str(tmp_path / "node.py"))
    assert r.returncode == 0, r.stderr[:1500] + "\n...\n" + r.stderr[-2500:]
    assert (tmp_path / "node0" / "run" / "checkpoint.pt").is_file() and not (tmp_path / "node1" / "run").exists()
    r = torchrun([*args, "--resume", "--no-bounds"], tmp_path, env, script=str(tmp_path / "node.py"))
    assert r.returncode == 0, r.stderr[:1500] + "\n...\n" + r.stderr[-2500:]
    assert "resumed from run/checkpoint.pt at step 1" in r.stdout and "Avg" in r.stdout
    assert (tmp_path / "node0" / "run" / "metrics.json").is_file() and not (tmp_path / "node1" / "run").exists()
    assert load_checkpoint(tmp_path / "node0" / "run" / "checkpoint.pt")["step"] == 2


# ---- the data path, precision, checkpoints and processes at full scale (each run here on a CPU)

@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 60), batch=st.sampled_from([4, 8, 12]), micro=st.integers(1, 8),
       world=st.sampled_from([1, 2, 4]), seed=st.integers(0, 3), start=st.integers(0, 20))
def test_sampler_takes_the_very_micro_batches_of_batch_indices(n, batch, micro, world, seed, start):
    """The DataLoader's sampler gives each process, step after step (from any resumed step), exactly the
    micro-batches `batch_indices` defines: one permutation per epoch, not one per step."""
    if batch % world or n < batch:
        return
    cfg = small_cfg(f"train.batch_size={batch}", f"train.micro_batch={micro}", f"train.seed={seed}")
    steps_per_epoch = n // batch
    for rank in range(world):
        sampler = StepSampler(n, cfg, rank, world, start, start + 3 * steps_per_epoch)
        want = [mb for s in range(start, start + 3 * steps_per_epoch)
                for mb in batch_indices(n, cfg, *divmod(s, steps_per_epoch), rank, world)]
        assert list(sampler) == want and len(sampler) == len(want)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 60), batch=st.sampled_from([4, 8, 12]), micro=st.integers(1, 8),
       world=st.sampled_from([1, 2, 4]), seed=st.integers(0, 3), data=st.data())
def test_micro_batches_ordered_by_length_hold_the_same_items(n, batch, micro, world, seed, data):
    """Given the items' lengths, each process's share of a step is the same items, cut into micro-batches
    shortest first; the sampler gives exactly those."""
    if batch % world or n < batch:
        return
    lengths = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    cfg = small_cfg(f"train.batch_size={batch}", f"train.micro_batch={micro}", f"train.seed={seed}")
    steps = n // batch
    for rank in range(world):
        for s in range(2 * steps):
            plain = batch_indices(n, cfg, *divmod(s, steps), rank, world)
            ordered = batch_indices(n, cfg, *divmod(s, steps), rank, world, lengths)
            flat = [j for mb in ordered for j in mb]
            assert sorted(flat) == sorted(j for mb in plain for j in mb)
            assert [len(mb) for mb in ordered] == [len(mb) for mb in plain]
            assert [lengths[j] for j in flat] == sorted(lengths[j] for j in flat)
        sampler = StepSampler(n, cfg, rank, world, 0, 2 * steps, lengths)
        assert list(sampler) == [mb for s in range(2 * steps)
                                 for mb in batch_indices(n, cfg, *divmod(s, steps), rank, world, lengths)]


def test_token_lengths_are_the_items_lengths(dataset):
    assert dataset.token_lengths() == [len(dataset[i]["tokens"]) for i in range(len(dataset))]
    short = VLDataset(dataset.examples[:8], dataset.tok, 32, "clip", max_len=60)      # prompts cut to fit
    assert short.token_lengths() == [len(short[i]["tokens"]) for i in range(8)]


def test_length_ordered_micro_batches_give_the_whole_batchs_step(dataset, tmp_path):
    """Steps of 8 items in micro-batches of 2, shortest first, move the adapters as the 8 at once."""
    got, start = {}, adapter_state_dict(fresh_model(small_cfg()))
    for micro in (8, 2):
        cfg = small_cfg("train.epochs=1", f"train.micro_batch={micro}", "train.warmup_epochs=0", "lsrm.dropout=0",
                        "vit.adapter_dropout=0")
        model = fresh_model(cfg)
        train(cfg, model, dataset, tmp_path / str(micro), stop_after=3, log=lambda s: None)
        got[micro] = adapter_state_dict(model)
    assert any(not torch.equal(start[k], got[8][k]) for k in start)
    assert all(torch.allclose(got[8][k], got[2][k], atol=1e-5, rtol=1e-4) for k in got[8])


def test_workers_change_no_number(dataset, tmp_path):
    """Batches built by 2 worker processes train exactly as batches built in the training process."""
    ds = dataset
    runs = {}
    for workers in (0, 2):
        cfg = small_cfg(f"train.workers={workers}")
        train(cfg, fresh_model(cfg), ds, tmp_path / str(workers), log=lambda s: None)
        runs[workers] = load_checkpoint(tmp_path / str(workers) / "checkpoint.pt")["adapters"]
    assert losses(tmp_path / "0") == losses(tmp_path / "2")
    assert all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_loader_hands_back_tensors_whatever_crossed_the_pipe(dataset):
    """The small tensors cross from a worker as numpy arrays (no shared-memory file each) and come back as
    tensors: with 2 workers the very batches, dtypes and all, of the loop built in the training process."""
    got = {}
    for workers in (0, 2):
        cfg = small_cfg(f"train.workers={workers}")
        got[workers] = list(train_module.make_loader(dataset, cfg, 0, 1, 0, 3, torch.device("cpu")))
    assert len(got[0]) == len(got[2]) == 6
    for a, b in zip(got[0], got[2]):
        assert a.keys() == b.keys() and all(isinstance(v, torch.Tensor) for v in b.values())
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert got[2][0]["images"].dtype == torch.uint8 and got[2][0]["tokens"].dtype == torch.long


def test_backward_runs_outside_autocast(dataset, tmp_path):
    """With bf16 frozen weights the forward runs under bf16 autocast and backward after it (gradients are
    then computed in the dtypes the forward saved, not re-autocast)."""
    ds = dataset
    cfg = small_cfg("train.epochs=1", "train.workers=0")
    model = cast_frozen(fresh_model(cfg), torch.bfloat16)
    during = []
    model.memory.p2.register_hook(lambda g: during.append(torch.is_autocast_enabled("cpu")))
    summary = train(cfg, model, ds, tmp_path, stop_after=2, log=lambda s: None)
    assert math.isfinite(summary["loss"]) and during == [False] * 2 * 2          # 2 steps x 2 micro-batches


def test_autocast_follows_the_frozen_dtype_and_fp16_is_refused():
    """On CUDA too: bf16 weights -> bf16 autocast; fp32 weights -> none (casting fp32 weights to bf16 on every
    forward would hold a second backbone); fp16 -> refused in one line (no loss scaling)."""
    assert isinstance(autocast(torch.device("cuda"), torch.float32), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), torch.float32), contextlib.nullcontext)
    with pytest.warns(UserWarning, match="CUDA"):                                     # no GPU here
        ctx = autocast(torch.device("cuda"), torch.bfloat16)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    for frozen in ("float16", torch.float16):
        with pytest.raises(ValueError, match="frozen_dtype=float16") as info:
            check_precision(frozen)
        assert "\n" not in str(info.value)
    check_precision("bfloat16"), check_precision(torch.float32)


def test_checkpoint_holds_rng_states_and_the_fingerprint_is_taken_once(dataset, tmp_path, monkeypatch):
    ds = dataset
    cfg = small_cfg("train.ckpt_every=2")
    calls = []
    monkeypatch.setattr(train_module, "backbone_fingerprint", lambda m: calls.append(1) or [1.0, 2.0])
    train(cfg, fresh_model(cfg), ds, tmp_path, log=lambda s: None)               # saves at 2, 4, 5, 6, 8, 10
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert calls == [1] and ckpt["backbone"] == [1.0, 2.0]
    assert len(ckpt["rng_states"]) == 1 and torch.equal(ckpt["rng_states"][0]["cpu"], ckpt["rng"])


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    """The logic on a CUDA device (faked here): its generator's state joins the CPU's, and comes back."""
    got = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, int(device.index)]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: got.update(state=state, device=device))
    gpu = torch.device("cuda", 3)
    state = rng_states(gpu)
    assert torch.equal(state["cuda"], torch.tensor([7, 3])) and torch.equal(state["cpu"], torch.get_rng_state())
    set_rng_states(state, gpu)
    assert got["device"] == gpu and torch.equal(got["state"], torch.tensor([7, 3]))
    assert "cuda" not in rng_states(torch.device("cpu"))


def test_process_group_takes_its_gpu_before_nccl(monkeypatch):
    """On CUDA each process sets its GPU (LOCAL_RANK) first and names it to init_process_group."""
    order = []
    monkeypatch.setenv("RANK", "5"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: order.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: order.append((backend, kw)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: order.append(("new_group", kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 5), monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    assert distributed() == (5, 8)
    gpu = torch.device("cuda", 1)
    assert order == [("set_device", gpu), ("nccl", {"device_id": gpu}),
                     ("new_group", {"backend": "gloo", "timeout": train_module.CPU_WAIT})]


def test_ddp_leaves_the_frozen_backbone_alone(tmp_path):
    """DDP neither broadcasts nor buckets the frozen weights: only the adapters are its parameters."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build(small_cfg())
        ddp = ddp_wrap(model)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert ddp.parameters_to_ignore == frozen and len(frozen) > 0                # not broadcast at wrap time
        trainable = {id(p) for n, p in model.named_parameters() if n in adapter_state_dict(model)}
        assert {id(p) for p in ddp._module_parameters} == trainable                     # nor bucketed
    finally:
        dist.destroy_process_group()


def test_sigterm_is_a_stop_request_and_a_second_ctrl_c_is_not(monkeypatch):
    with StopOnInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)                 # a scheduler and torchrun may both send one
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _worker(quiet, conn):
    quiet(0)
    while True:
        conn.send(conn.recv())                                   # answers every message while it lives


def test_workers_outlive_sigterm_only_while_the_loop_runs():
    """A worker ignores SIGTERM during the loop (the training process finishes its step, then stops them) and
    dies of it after `over()`, as the DataLoader's and Python's shutdown expect (else exit would hang)."""
    import multiprocessing
    quiet, (ours, theirs) = train_module.QuietWorkers(), multiprocessing.Pipe()
    worker = multiprocessing.get_context("fork").Process(target=_worker, args=(quiet, theirs), daemon=True)
    worker.start()
    ours.send("up"), ours.recv()                                 # its handlers are in place
    os.kill(worker.pid, signal.SIGTERM)
    ours.send("still there?")
    assert ours.recv() == "still there?"                         # it took the signal and carried on
    quiet.over()
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=60)
    assert worker.exitcode == 128 + signal.SIGTERM


class BreaksAt(torch.utils.data.Dataset):
    """A dataset whose item `bad` will not decode, as a corrupt picture met only when read."""

    def __init__(self, ds, bad):
        self.ds, self.bad, self.collate = ds, bad, ds.collate

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i == self.bad:
            raise DataError("images/train/7/image.png: not a readable image (truncated)")
        return self.ds[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_picture_met_in_training_is_one_line_after_a_checkpoint(dataset, tmp_path, workers):
    ds = dataset
    cfg = small_cfg(f"train.workers={workers}")
    bad = batch_indices(len(ds), cfg, 0, 3, 0, 1)[0][0]                     # an item of step 4 of epoch 1
    with pytest.raises(DataError) as info:
        train(cfg, fresh_model(cfg), BreaksAt(ds, bad), tmp_path, log=lambda s: None)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("images/train/7/image.png: not a readable image")
    assert "step 3/10" in msg and "--resume" in msg
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3 and len(losses(tmp_path)) == 3


def test_a_checkpoint_from_before_these_fields_resumes_exactly(dataset, tmp_path):
    """A checkpoint written before train.workers / image_cache_mb / check_images existed, with ckpt_every 0 and
    only rank 0's CPU random state, still resumes, exactly (one process)."""
    ds = dataset
    cfg = small_cfg()
    train(cfg, fresh_model(cfg), ds, tmp_path / "whole", log=lambda s: None)
    part = tmp_path / "part"
    train(cfg, fresh_model(cfg), ds, part, stop_after=3, log=lambda s: None)
    old = torch.load(part / "checkpoint.pt", weights_only=True)
    del old["rng_states"]
    for k in ("workers", "image_cache_mb", "check_images"):
        del old["config"]["train"][k]
    old["config"]["train"]["ckpt_every"] = 0
    torch.save(old, part / "checkpoint.pt")
    notes = []
    train(cfg, fresh_model(cfg), ds, part, resume=True, log=notes.append)
    assert losses(part) == losses(tmp_path / "whole") and not any("note" in n for n in notes)

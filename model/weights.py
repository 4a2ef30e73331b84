"""Loading real checkpoints into the model.

    vision (into `vit.VisionTransformer`, openai/CLIP's names)
      openai    ViT-L-14.pt TorchScript archive, or a plain state dict (.pt/.pth/.bin/.safetensors)
                with `visual.*` keys (the text tower is skipped) or the bare visual keys
      hf-clip   Hugging Face CLIPVisionModel / CLIPModel directory (config.json + *.safetensors)
      timm      timm `vit_large_patch14_clip_224` state dict
    language (into `llama.Transformer`, Meta's names)
      meta      params.json + consolidated.*.pth (model-parallel shards merged here)
      hf        config.json + *.safetensors (single or sharded; HF's rotary permutation undone)
      gguf      llama.cpp GGUF (dequantised; q/k are already in Meta's rotary layout)

Every format is one key-mapping table (checkpoint key -> ours, `{i}` = block index), a config
reader, and lazy tensor getters, so a big model is filled tensor by tensor straight into a model
built on the meta device and is never held twice. Loaders fail loudly: an unexpected, missing or
misshapen tensor, or an architecture that differs from the chosen config, is a `WeightsError` naming
the key or field and the file. What no backbone checkpoint holds (the ViT adapters, the visual
memory) is created afterwards by `materialize`.

    model = build(cfg, device="meta")
    load_backbones(model, vit_path="ViT-L-14.pt", llm_path="llama-2-7b/", dtype=torch.bfloat16)
    materialize(model, dtype=torch.bfloat16)          # adapters and memory in fp32, freshly initialised
    # or in one call: load_pretrained(cfg, "ViT-L-14.pt", "llama-2-7b/", dtype=torch.bfloat16)

`read_llama_config(path)` gives a checkpoint's own decoder config (for checkpoints no preset describes);
`to_hf_llama_state_dict` / `to_hf_llama_config` go back to transformers' layout (reference comparisons).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pickle
import re
import zipfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from .config import LlamaConfig, ViTConfig
from .errors import WeightsError
from .llama import RMSNorm, Transformer, rope_frequencies
from .memory import VisualMemory
from .tokenizer import need
from .vit import BottleneckAdapter, VisionTransformer
from .vlm import build, is_adapter, mark_only_adapters_trainable


class Source(NamedTuple):
    """One of our tensors, read lazily from a checkpoint."""
    file: str
    key: str                               # the checkpoint key(s) it comes from, for error messages
    get: Callable[[], torch.Tensor]


Tensors = dict[str, tuple[str, Callable[[], torch.Tensor]]]   # checkpoint key -> (file, getter)


def _need(module: str, path):                  # an optional package, only for the formats that use it
    return need(module, f"reading {path}")


def all_finite(t: torch.Tensor, chunk: int = 1 << 26) -> bool:
    """No NaN or inf in `t`, checked in slices (a whole 500M-entry embedding would need as many bytes)."""
    return all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(chunk))


# ---------------------------------------------------------------------------------------------
# Key-mapping tables. A value is our key, or (our key, transform(tensor, cfg)), or (our key, n) for the
# n-th piece of a tensor we fuse by concatenation along dim 0 (HF CLIP's separate q, k, v).

def _wb(theirs: str, ours: str) -> dict:
    """A Linear or LayerNorm: .weight and .bias map alike."""
    return {f"{theirs}.{p}": f"{ours}.{p}" for p in ("weight", "bias")}


def _t(w, cfg):                            # Linear weight (out, in) -> CLIP's `proj` (in, out)
    return w.t()


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF rotary layout of wq/wk rows: per head, the interleaved pairs (0,1),(2,3).. become the
    two halves (0..hd/2-1 | hd/2..hd-1) that HF's rotate_half expects. (H*hd, D) -> (H*hd, D)."""
    out, d = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d).transpose(1, 2).reshape(out, d)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta: the inverse of `permute_rotary`."""
    out, d = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d).transpose(1, 2).reshape(out, d)


_BLK = "transformer.resblocks.{i}"
OPENAI_CLIP = {                            # vit.py uses openai/CLIP's names: the table is the identity
    "conv1.weight": "conv1.weight",
    "class_embedding": "class_embedding",
    "positional_embedding": "positional_embedding",
    **_wb("ln_pre", "ln_pre"),
    **_wb(f"{_BLK}.ln_1", f"{_BLK}.ln_1"),
    f"{_BLK}.attn.in_proj_weight": f"{_BLK}.attn.in_proj_weight",
    f"{_BLK}.attn.in_proj_bias": f"{_BLK}.attn.in_proj_bias",
    **_wb(f"{_BLK}.attn.out_proj", f"{_BLK}.attn.out_proj"),
    **_wb(f"{_BLK}.ln_2", f"{_BLK}.ln_2"),
    **_wb(f"{_BLK}.mlp.c_fc", f"{_BLK}.mlp.c_fc"),
    **_wb(f"{_BLK}.mlp.c_proj", f"{_BLK}.mlp.c_proj"),
    **_wb("ln_post", "ln_post"),
    "proj": "proj",
}

_HF = "encoder.layers.{i}"
HF_CLIP = {                                # keys under `vision_model.`, which _open_vit strips
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    **_wb("pre_layrnorm", "ln_pre"),                                # (sic): HF's spelling
    **_wb(f"{_HF}.layer_norm1", f"{_BLK}.ln_1"),
    **{f"{_HF}.self_attn.{x}_proj.{p}": (f"{_BLK}.attn.in_proj_{p}", n)
       for n, x in enumerate("qkv") for p in ("weight", "bias")},
    **_wb(f"{_HF}.self_attn.out_proj", f"{_BLK}.attn.out_proj"),
    **_wb(f"{_HF}.layer_norm2", f"{_BLK}.ln_2"),
    **_wb(f"{_HF}.mlp.fc1", f"{_BLK}.mlp.c_fc"),
    **_wb(f"{_HF}.mlp.fc2", f"{_BLK}.mlp.c_proj"),
    **_wb("post_layernorm", "ln_post"),
    "visual_projection.weight": ("proj", _t),                      # CLIPModel / ...WithProjection only
}
HF_CLIP_DROP = ("embeddings.position_ids",                         # a buffer older versions saved
                "text_model.*", "text_projection.weight", "logit_scale")   # CLIPModel's text tower

TIMM_CLIP = {
    "patch_embed.proj.weight": "conv1.weight",
    "cls_token": ("class_embedding", lambda w, cfg: w.reshape(-1)),            # (1, 1, Dv) -> (Dv,)
    "pos_embed": ("positional_embedding", lambda w, cfg: w.reshape(w.shape[-2:])),  # (1, 1+P, Dv) -> (1+P, Dv)
    **_wb("norm_pre", "ln_pre"),
    **_wb("blocks.{i}.norm1", f"{_BLK}.ln_1"),
    "blocks.{i}.attn.qkv.weight": f"{_BLK}.attn.in_proj_weight",   # already fused, same q, k, v order
    "blocks.{i}.attn.qkv.bias": f"{_BLK}.attn.in_proj_bias",
    **_wb("blocks.{i}.attn.proj", f"{_BLK}.attn.out_proj"),
    **_wb("blocks.{i}.norm2", f"{_BLK}.ln_2"),
    **_wb("blocks.{i}.mlp.fc1", f"{_BLK}.mlp.c_fc"),
    **_wb("blocks.{i}.mlp.fc2", f"{_BLK}.mlp.c_proj"),
    **_wb("norm", "ln_post"),
    "head.weight": ("proj", _t),
}
TIMM_CLIP_DROP = ("head.bias",)            # zeros in timm's conversion of CLIP (checked in _open_vit)

# Never in a backbone checkpoint: MemVP's adapters (fresh init, fc2 = 0, by `materialize`).
VIT_NOT_IN_CHECKPOINTS = ("transformer.resblocks.*.adapter.*",)

_L = "layers.{i}"
_META_NAMES = ("tok_embeddings.weight", "norm.weight", "output.weight",
               *(f"{_L}.{m}.weight" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                              "attention_norm", "ffn_norm")))
META_LLAMA = {k: k for k in _META_NAMES}   # llama.py uses Meta's names: the table is the identity
META_DROP = ("rope.freqs",)                # LLaMA-1's saved rotary table; recomputed from the config
# Model-parallel shards: column-parallel weights split the output dim (0), row-parallel the input (1);
# tok_embeddings is decided from the shapes (None); 1-D norms are replicated in every shard.
META_SHARD_AXIS = {"output.weight": 0, f"{_L}.attention.wq.weight": 0, f"{_L}.attention.wk.weight": 0,
                   f"{_L}.attention.wv.weight": 0, f"{_L}.attention.wo.weight": 1,
                   f"{_L}.feed_forward.w1.weight": 0, f"{_L}.feed_forward.w2.weight": 1,
                   f"{_L}.feed_forward.w3.weight": 0, "tok_embeddings.weight": None}

_H = "model.layers.{i}"
HF_LLAMA = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    f"{_H}.input_layernorm.weight": f"{_L}.attention_norm.weight",
    f"{_H}.self_attn.q_proj.weight": (f"{_L}.attention.wq.weight", lambda w, c: unpermute_rotary(w, c.n_heads)),
    f"{_H}.self_attn.k_proj.weight": (f"{_L}.attention.wk.weight", lambda w, c: unpermute_rotary(w, c.n_kv_heads)),
    f"{_H}.self_attn.v_proj.weight": f"{_L}.attention.wv.weight",
    f"{_H}.self_attn.o_proj.weight": f"{_L}.attention.wo.weight",
    f"{_H}.post_attention_layernorm.weight": f"{_L}.ffn_norm.weight",
    f"{_H}.mlp.gate_proj.weight": f"{_L}.feed_forward.w1.weight",
    f"{_H}.mlp.down_proj.weight": f"{_L}.feed_forward.w2.weight",
    f"{_H}.mlp.up_proj.weight": f"{_L}.feed_forward.w3.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LLAMA_DROP = ("model.rotary_emb.inv_freq", f"{_H}.self_attn.rotary_emb.inv_freq")  # old saved buffers

_B = "blk.{i}"
GGUF_LLAMA = {
    "token_embd.weight": "tok_embeddings.weight",
    f"{_B}.attn_norm.weight": f"{_L}.attention_norm.weight",
    f"{_B}.attn_q.weight": f"{_L}.attention.wq.weight",    # llama.cpp stores q/k in Meta's layout
    f"{_B}.attn_k.weight": f"{_L}.attention.wk.weight",
    f"{_B}.attn_v.weight": f"{_L}.attention.wv.weight",
    f"{_B}.attn_output.weight": f"{_L}.attention.wo.weight",
    f"{_B}.ffn_norm.weight": f"{_L}.ffn_norm.weight",
    f"{_B}.ffn_gate.weight": f"{_L}.feed_forward.w1.weight",
    f"{_B}.ffn_down.weight": f"{_L}.feed_forward.w2.weight",
    f"{_B}.ffn_up.weight": f"{_L}.feed_forward.w3.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_DROP = ("rope_freqs.weight",)         # LLaMA-3.1 scaling factors, checked against the config


def _template(key: str) -> tuple[str, str | None]:
    """'blk.7.attn_q.weight' -> ('blk.{i}.attn_q.weight', '7')."""
    m = re.search(r"\.(\d+)\.", key)
    return (key[:m.start()] + ".{i}." + key[m.end():], m.group(1)) if m else (key, None)


def _map(tensors: Tensors, table: dict, drop: tuple, cfg, fmt: str) -> dict[str, Source]:
    """Checkpoint tensors -> our keys through `table`; a key in neither `table` nor `drop` is an error."""
    out: dict[str, Source] = {}
    pieces: dict[str, dict[int, str]] = {}
    for key, (file, get) in tensors.items():
        tmpl, i = _template(key)
        if any(fnmatch(tmpl, pattern) for pattern in drop):
            continue
        if tmpl not in table:
            raise WeightsError(f"{file}: unexpected tensor {key!r} (not in the {fmt} key map)")
        rule = table[tmpl]
        ours, how = (rule, None) if isinstance(rule, str) else rule
        ours = ours.format(i=i)
        if isinstance(how, int):
            pieces.setdefault(ours, {})[how] = key
        else:
            out[ours] = Source(file, key, lambda get=get, how=how: how(get(), cfg) if how else get())
    for ours, parts in pieces.items():
        keys = [parts[n] for n in sorted(parts)]
        file = tensors[keys[0]][0]
        if sorted(parts) != [0, 1, 2]:
            raise WeightsError(f"{file}: {ours} is fused from q, k, v but only {keys} are present")
        out[ours] = Source(file, "+".join(keys), lambda keys=keys: torch.cat([tensors[k][1]() for k in keys]))
    return out


# ---------------------------------------------------------------------------------------------
# Filling a (meta-device) module

def _assign(module: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    mod = module.get_submodule(owner)
    setattr(mod, attr, nn.Parameter(t, requires_grad=getattr(mod, attr).requires_grad))


def _fill(module: nn.Module, sources: dict[str, Source], path, allowed_missing: tuple, device, dtype,
          prefix: str) -> None:
    """Check the key sets, then read, shape-check and assign one tensor at a time."""
    params = dict(module.named_parameters())
    for name, src in sources.items():
        if name not in params:
            raise WeightsError(f"{src.file}: unexpected tensor {src.key!r} (the model has no {prefix}{name})")
    for name in params:
        if name not in sources and not any(fnmatch(name, p) for p in allowed_missing):
            raise WeightsError(f"{path}: missing tensor for {prefix}{name}")
    for name, src in sources.items():
        t = src.get()
        if t.shape != params[name].shape:
            raise WeightsError(f"{src.file}: {src.key!r} has shape {tuple(t.shape)} but {prefix}{name} "
                               f"is {tuple(params[name].shape)}")
        t = t.to(device=device, dtype=dtype)
        if not all_finite(t):                  # else it trains "successfully" to a NaN loss and checkpoint
            raise WeightsError(f"{src.file}: {src.key!r} holds NaN or inf (as {str(dtype).removeprefix('torch.')})")
        _assign(module, name, t)


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _check(ours: dict, found: dict, path, group: str) -> None:
    for field, value in found.items():
        if not _same(value, ours[field]):
            raise WeightsError(f"{path}: {group}.{field} is {value!r} in the checkpoint but {ours[field]!r} "
                               f"in the config")


# ---------------------------------------------------------------------------------------------
# Reading files

def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def _json(path: Path) -> dict:
    """A JSON file (config.json, params.json, an index), or a WeightsError naming it and the fault."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise WeightsError(f"{path}: not valid JSON{where}") from None


def _check_safetensors(path: Path) -> None:
    """The file is a whole safetensors file: an 8-byte header length, a JSON header, then every tensor's
    bytes (the header's data_offsets). Cheap: reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise WeightsError(f"{path}: not a safetensors file (no valid header)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightsError(f"{path}: not a safetensors file (its header is not JSON)") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) > size:
        raise WeightsError(f"{path}: truncated ({size:,} bytes; its header lists {8 + n + max(ends):,})")


def _torch_load(path: Path, **kw):
    """torch.load restricted to tensors (weights_only): a file that would run code is refused, a damaged
    one reported, each in one line naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError:
        raise WeightsError(f"{path}: refused: loading it would run code (not a plain tensor file)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        why = "truncated or damaged" if "PytorchStreamReader" in str(e) or isinstance(e, EOFError) else "unreadable"
        raise WeightsError(f"{path}: {why} ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        _check_safetensors(path)
        return _need("safetensors.torch", path).load_file(str(path))
    if _is_torchscript(path):                  # OpenAI's ViT-L-14.pt: torch.load(weights_only) refuses it
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as e:
            raise WeightsError(f"{path}: a damaged TorchScript archive ({str(e).splitlines()[0][:80]})") from None
    return _torch_load(path)


def _hf_tensors(d: Path) -> Tensors:
    """Every tensor of a Hugging Face directory: *.safetensors (or .bin), single or sharded by an index."""
    index = next((d / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (d / n).exists()), None)
    if index is not None:
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (d / name).is_file():
                raise WeightsError(f"{index}: shard {name} listed in the index is missing")
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).exists()][:1]
    if not files:
        raise WeightsError(f"{d}: no model.safetensors, pytorch_model.bin or index file")
    out: Tensors = {}
    for name in files:
        f = d / name
        if f.suffix == ".safetensors":
            _check_safetensors(f)
            handle = _need("safetensors", f).safe_open(str(f), framework="pt")
            out.update({k: (str(f), lambda h=handle, k=k: h.get_tensor(k)) for k in handle.keys()})
        else:
            sd = _torch_load(f, mmap=True)
            out.update({k: (str(f), lambda sd=sd, k=k: sd[k]) for k in sd})
    return out


def detect_format(path) -> str:
    """'meta' | 'hf' | 'hf-clip' | 'gguf' | 'torchscript' | 'state-dict', from the path alone."""
    p = Path(path)
    if p.is_dir():
        if (p / "params.json").exists():
            return "meta"
        if (p / "config.json").exists():
            model_type = str(_json(p / "config.json").get("model_type", ""))
            return "hf-clip" if model_type.startswith("clip") else "hf"
        raise WeightsError(f"{p}: a checkpoint directory needs params.json (Meta) or config.json (Hugging Face)")
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    if p.suffix == ".gguf":
        return "gguf"
    return "torchscript" if _is_torchscript(p) else "state-dict"


# ---------------------------------------------------------------------------------------------
# Vision

HF_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, layer_norm_eps=1e-5,
                        hidden_act="quick_gelu")               # transformers' CLIPVisionConfig defaults


def _vit_fields(cfg: ViTConfig) -> dict:
    return dict(width=cfg.width, layers=cfg.layers, heads=cfg.heads, patch_size=cfg.patch_size, grid=cfg.grid,
                output_dim=cfg.output_dim, eps=cfg.eps, mlp_width=4 * cfg.width, hidden_act="quick_gelu")


def _vit_arch_from_tensors(src: dict[str, Source]) -> dict:
    """Architecture from shapes, as openai/CLIP's build_model does (heads are not recorded: see load_vit)."""
    arch = {}
    if "conv1.weight" in src:
        conv = src["conv1.weight"].get()                                     # (Dv, 3, p, p)
        arch.update(width=conv.shape[0], patch_size=conv.shape[-1])
    if "positional_embedding" in src:
        arch["grid"] = math.isqrt(src["positional_embedding"].get().shape[0] - 1)   # (1 + g*g, Dv)
    blocks = {int(k.split(".")[2]) for k in src if k.startswith("transformer.resblocks.")}
    if blocks:
        arch["layers"] = max(blocks) + 1
    if "proj" in src:
        arch["output_dim"] = src["proj"].get().shape[1]                      # (Dv, output_dim)
    return arch


def _open_vit(path) -> tuple[str, dict, dict[str, Source], tuple]:
    """-> (format, architecture found, our sources, what may be missing besides the adapters)."""
    p, fmt = Path(path), detect_format(path)
    if fmt not in ("hf-clip", "torchscript", "state-dict"):
        raise WeightsError(f"{p}: a {fmt} checkpoint is not a CLIP vision tower")
    if fmt == "hf-clip":                                            # Hugging Face CLIPVisionModel / CLIPModel
        config = _json(p / "config.json")
        v = {**HF_CLIP_DEFAULTS, **config.get("vision_config", config)}    # CLIPModel nests it
        # transformers >= 5 saves CLIPVisionModel without the `vision_model.` prefix that CLIPModel has
        tensors = {k.removeprefix("vision_model."): t for k, t in _hf_tensors(p).items()}
        src = _map(tensors, HF_CLIP, HF_CLIP_DROP, None, "HF CLIP")
        arch = dict(width=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                    patch_size=v["patch_size"], grid=v["image_size"] // v["patch_size"], eps=v["layer_norm_eps"],
                    mlp_width=v["intermediate_size"], hidden_act=v["hidden_act"])
        if "proj" in src:                                           # CLIPModel keeps projection_dim outside
            arch["output_dim"] = src["proj"].get().shape[1]
        return "hf-clip", arch, src, ("proj",)         # CLIPVisionModel has no projection: ours stays as is
    sd = _read_state_dict(p)
    tensors = {k: (str(p), lambda v=v: v) for k, v in sd.items()}
    if "cls_token" in sd:
        if "head.bias" in sd and sd["head.bias"].abs().max() > 0:
            raise WeightsError(f"{p}: 'head.bias' is not zero, but CLIP's proj has no bias")
        fmt, src, missing = "timm", _map(tensors, TIMM_CLIP, TIMM_CLIP_DROP, None, "timm CLIP"), ("proj",)
    else:
        if any(k.startswith("visual.") for k in sd):                # a whole CLIP: keep the visual tower
            tensors = {k[len("visual."):]: v for k, v in tensors.items() if k.startswith("visual.")}
        fmt, src, missing = "openai", _map(tensors, OPENAI_CLIP, (), None, "OpenAI CLIP"), ()
    return fmt, _vit_arch_from_tensors(src), src, missing


def load_vit(vit: VisionTransformer, path, device="cpu", dtype=torch.float32) -> str:
    """Fill `vit` (built on any device, typically meta) from a checkpoint; returns the format found."""
    fmt, arch, src, missing = _open_vit(path)
    _check(_vit_fields(vit.cfg), arch, path, "vit")
    # OpenAI and timm files do not record the head count; openai/CLIP (and timm's CLIP towers) build
    # width / 64 heads for every released width (768, 1024, 1280): another count would load silently wrong
    if fmt in ("openai", "timm") and arch.get("width", 0) >= 768 and vit.cfg.heads != arch["width"] // 64:
        raise WeightsError(f"{path}: vit.heads is {vit.cfg.heads}, but a CLIP tower of width {arch['width']} has "
                           f"{arch['width'] // 64} heads (width / 64; {fmt} files do not record it)")
    _fill(vit, src, path, VIT_NOT_IN_CHECKPOINTS + missing, device, dtype, "visual.")
    return fmt


# ---------------------------------------------------------------------------------------------
# Language

HF_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                         max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_theta=10000.0, attention_bias=False, mlp_bias=False)  # transformers' LlamaConfig


def _llama_fields(cfg: LlamaConfig) -> dict:
    """What must agree between a checkpoint and the config (max_seq_len is a choice, not a weight)."""
    return dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                vocab_size=cfg.vocab_size, ffn_hidden=cfg.ffn_hidden, norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, tie_embeddings=cfg.tie_embeddings)


def _open_meta(d: Path) -> tuple[LlamaConfig, dict[str, Source]]:
    params = _json(d / "params.json")
    files = sorted(d.glob("consolidated.*.pth"))
    if not files:
        raise WeightsError(f"{d}: params.json but no consolidated.*.pth")
    shards = [_torch_load(f, mmap=True) for f in files]  # mapped, not read
    for f, s in zip(files[1:], shards[1:]):
        if s.keys() != shards[0].keys():
            odd = sorted(s.keys() ^ shards[0].keys())[0]
            raise WeightsError(f"{f}: shards disagree on tensor {odd!r}")
    # Meta splits each attention projection's output rows evenly over consolidated.00.pth, 01, ...: the
    # shard count is dim / rows per shard, and a missing shard would otherwise surface as a shape mismatch
    rows = shards[0]["layers.0.attention.wq.weight"].shape[0] if "layers.0.attention.wq.weight" in shards[0] else 0
    dim = params.get("dim", 0)
    if rows and dim % rows == 0 and dim // rows != len(files):
        want = [f"consolidated.{i:02d}.pth" for i in range(dim // rows)]
        gone = [n for n in want if not (d / n).is_file()]
        raise WeightsError(f"{d}: {len(files)} of its {len(want)} consolidated.*.pth shards are here "
                           f"(missing: {', '.join(gone[:3]) or 'see the file names'})")

    def merged(key: str) -> torch.Tensor:
        pieces = [s[key] for s in shards]
        if len(pieces) == 1 or pieces[0].dim() == 1:
            return pieces[0]                                   # norms are replicated in every shard
        axis = META_SHARD_AXIS.get(_template(key)[0], 0)
        if axis is None:   # LLaMA-1/2's ParallelEmbedding splits dim (1); LLaMA-3's VocabParallelEmbedding vocab (0)
            axis = 0 if pieces[0].shape[1] == params["dim"] else 1
        return torch.cat(pieces, dim=axis)

    vocab = params.get("vocab_size", -1)
    if vocab <= 0:                 # LLaMA-1/2 write -1; their embedding shards each hold the whole vocabulary
        vocab = shards[0]["tok_embeddings.weight"].shape[0]
    # LLaMA-3.2 ties the head yet Meta's files store it twice: tied iff absent or identical
    has_output = "output.weight" in shards[0]
    tied = not has_output or torch.equal(merged("output.weight"), merged("tok_embeddings.weight"))
    scaling = None
    if params.get("use_scaled_rope"):
        # params.json does not state the factor: LLaMA-3.2 1B/3B (the tied ones) use 32, LLaMA-3.1 uses 8
        # (HF's configs and Meta's llama-models agree on these)
        factor = params.get("rope_scaling_factor", 32.0 if tied else 8.0)
        scaling = (float(factor), 1.0, float(params.get("high_freq_factor", 4.0)), 8192)
    cfg = LlamaConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                      n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab, multiple_of=params.get("multiple_of", 256),
                      ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
                      rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
                      max_seq_len=params.get("max_seq_len", 2048), tie_embeddings=tied)
    drop = META_DROP + (("output.weight",) if tied else ())
    tensors = {k: (str(files[0]) if len(files) == 1 else f"{d}/consolidated.*.pth", lambda k=k: merged(k))
               for k in shards[0]}
    return cfg, _map(tensors, META_LLAMA, drop, cfg, "Meta LLaMA")


def _open_hf_llama(d: Path) -> tuple[LlamaConfig, dict[str, Source]]:
    c = {**HF_LLAMA_DEFAULTS, **_json(d / "config.json")}
    file = d / "config.json"
    for key, want in (("model_type", "llama"), ("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if c.get(key) != want:
            raise WeightsError(f"{file}: {key} is {c.get(key)!r}; this decoder needs {want!r}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}     # transformers >= 5 | < 5
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise WeightsError(f"{file}: rope type {kind!r} is not supported (only default and llama3)")
    scaling = None if kind == "default" else (float(rope["factor"]), float(rope["low_freq_factor"]),
                                               float(rope["high_freq_factor"]),
                                               int(rope["original_max_position_embeddings"]))
    cfg = LlamaConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      n_kv_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                      hidden_dim=c["intermediate_size"],
                      norm_eps=c["rms_norm_eps"], rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
                      rope_scaling=scaling, max_seq_len=c["max_position_embeddings"],
                      tie_embeddings=c["tie_word_embeddings"])
    if c.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise WeightsError(f"{file}: head_dim is {c['head_dim']} but hidden_size / num_attention_heads is "
                           f"{cfg.head_dim}")
    # some tied checkpoints store lm_head anyway: it is the embedding
    drop = HF_LLAMA_DROP + (("lm_head.weight",) if cfg.tie_embeddings else ())
    return cfg, _map(_hf_tensors(d), HF_LLAMA, drop, cfg, "HF LLaMA")


@functools.lru_cache(maxsize=1)
def _gguf_reader(path: str, mtime_ns: int):
    """Parsing a GGUF's metadata takes seconds (its vocabulary): once for reading the config and loading."""
    return _need("gguf", path).GGUFReader(path)


def _open_gguf(path: Path) -> tuple[LlamaConfig, dict[str, Source]]:
    gguf = _need("gguf", path)
    try:
        reader = _gguf_reader(str(path), path.stat().st_mtime_ns)
    except Exception as e:  # noqa: BLE001 - the gguf reader raises anything on a cut or foreign file
        with open(path, "rb") as f:
            what = "truncated or damaged" if f.read(4) == b"GGUF" else "not a GGUF file"
        raise WeightsError(f"{path}: {what} (the gguf reader fails: {type(e).__name__})") from None
    size = path.stat().st_size
    for t in reader.tensors:                      # the reader maps the file: a cut one yields short arrays
        if t.data_offset + t.n_bytes > size:
            raise WeightsError(f"{path}: truncated ({size:,} bytes; tensor {t.name!r} ends at byte "
                               f"{t.data_offset + t.n_bytes:,})")

    def meta(key, default=KeyError):
        if key in reader.fields:
            return reader.fields[key].contents()
        if default is KeyError:
            raise WeightsError(f"{path}: no metadata {key!r}")
        return default

    arch = meta("general.architecture")
    if arch != "llama":
        raise WeightsError(f"{path}: general.architecture is {arch!r}; only 'llama' loads into this decoder")
    found = {t.name: t for t in reader.tensors}

    def get(t) -> torch.Tensor:
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightsError(f"{path}: {t.name!r} is {t.tensor_type.name}, which gguf cannot dequantise") from None
        a = np.asarray(a).reshape(tuple(reversed(t.shape.tolist())))   # GGUF lists dims innermost first
        return torch.from_numpy(np.array(a))                           # a copy: the reader's memmap is read-only

    vocab = meta(f"{arch}.vocab_size", None) or int(found["token_embd.weight"].shape[1])   # shape: (dim, vocab)
    if meta(f"{arch}.rope.scaling.type", "none") not in ("none",):
        raise WeightsError(f"{path}: rope scaling {meta(f'{arch}.rope.scaling.type')!r} is not supported")
    cfg = LlamaConfig(dim=meta(f"{arch}.embedding_length"), n_layers=meta(f"{arch}.block_count"),
                      n_heads=meta(f"{arch}.attention.head_count"),
                      n_kv_heads=meta(f"{arch}.attention.head_count_kv", None), vocab_size=vocab,
                      hidden_dim=meta(f"{arch}.feed_forward_length"),
                      norm_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
                      rope_theta=float(meta(f"{arch}.rope.freq_base", 10000.0)),
                      max_seq_len=meta(f"{arch}.context_length", 2048), tie_embeddings="output.weight" not in found)
    if meta(f"{arch}.rope.dimension_count", cfg.head_dim) != cfg.head_dim:
        raise WeightsError(f"{path}: rotary on {meta(f'{arch}.rope.dimension_count')} of {cfg.head_dim} head dims "
                           f"is not supported")
    if "rope_freqs.weight" in found:
        # llama.cpp stores LLaMA-3.1 scaling as per-frequency divisors; recover ours and check it reproduces them
        factors = get(found["rope_freqs.weight"]).float()
        old_len = int(meta(f"{arch}.rope.scaling.original_context_length", 8192))
        cfg.rope_scaling = (float(factors.max()), 1.0, 4.0, old_len)
        plain = dataclasses.replace(cfg, rope_scaling=None)
        if not torch.allclose(rope_frequencies(plain) / rope_frequencies(cfg), factors, rtol=1e-3):
            raise WeightsError(f"{path}: 'rope_freqs.weight' is not LLaMA-3.1 scaling with factors (.., 1, 4, ..)")
    tensors = {name: (str(path), lambda t=t: get(t)) for name, t in found.items()}
    return cfg, _map(tensors, GGUF_LLAMA, GGUF_DROP, cfg, "GGUF LLaMA")


def _open_llama(path) -> tuple[str, LlamaConfig, dict[str, Source]]:
    fmt = detect_format(path)
    opener = {"meta": _open_meta, "hf": _open_hf_llama, "gguf": _open_gguf}.get(fmt)
    if opener is None:
        raise WeightsError(f"{path}: a {fmt} file is not a LLaMA checkpoint (use a Meta or HF directory, or .gguf)")
    return (fmt, *opener(Path(path)))


def read_llama_config(path) -> LlamaConfig:
    """The checkpoint's own decoder config (params.json / config.json / GGUF metadata), e.g. to build a
    model for a checkpoint no preset describes: `Transformer(read_llama_config(path))` on the meta device."""
    return _open_llama(path)[1]


def load_llama(llm: Transformer, path, device="cpu", dtype=torch.float32) -> str:
    """Fill `llm` from a checkpoint after checking its config against `llm.cfg`; returns the format."""
    fmt, cfg, src = _open_llama(path)
    if cfg.norm_eps != llm.cfg.norm_eps:      # eps is the checkpoint's (e.g. Vicuna v1.1: 1e-6, v1.5: 1e-5)
        llm.cfg.norm_eps = cfg.norm_eps
        for m in llm.modules():
            if isinstance(m, RMSNorm):
                m.eps = cfg.norm_eps
    _check(_llama_fields(llm.cfg), _llama_fields(cfg), path, "llama")
    _fill(llm, src, path, (), device, dtype, "llama.")
    return fmt


# ---------------------------------------------------------------------------------------------
# The whole model

def load_own(module: nn.Module, state: dict[str, torch.Tensor], what: str, **kw) -> None:
    """Load a state dict in our own names (the tiny pretrained backbones): every key must match, and only
    adapters may be absent (they start fresh)."""
    missing, unexpected = module.load_state_dict(state, strict=False, **kw)
    if unexpected or not all(is_adapter(k) for k in missing):
        raise WeightsError(f"the {what} does not fit this config: {(unexpected + missing)[:3]}")


def load_backbones(model: nn.Module, vit_path=None, llm_path=None, device="cpu", dtype=torch.float32) -> nn.Module:
    """Fill the frozen parts of an `LSRM` (`.visual`, `.llama`), typically built with device="meta".
    `vit_path` may also be a state dict in our own names (the tiny pretrained ViT)."""
    if isinstance(vit_path, dict):
        state = {k: v.to(device=device, dtype=dtype) for k, v in vit_path.items()}
        load_own(model.visual, state, "tiny ViT", assign=True)
    elif vit_path is not None:
        load_vit(model.visual, vit_path, device, dtype)
    if llm_path is not None:
        load_llama(model.llama, llm_path, device, dtype)
    return model


@torch.no_grad()
def materialize(model: nn.Module, device="cpu", dtype=torch.float32) -> nn.Module:
    """Create and initialise what is still on the meta device after loading (in an LSRM or a bare ViT):
    the ViT adapters and the visual memory (trainable, so in fp32), and a ViT's `proj` when the checkpoint
    had none (in `dtype`; LSRM never applies it). Anything else still on meta was never loaded: an error."""
    fresh = {n for n, p in model.named_parameters() if p.is_meta}
    projs = {f"{n}.proj".lstrip(".") for n, m in model.named_modules() if isinstance(m, VisionTransformer)}
    stray = sorted(n for n in fresh if not is_adapter(n) and n not in projs)
    if stray:
        raise WeightsError(f"{stray[0]} (and {len(stray) - 1} more) was never loaded: load its checkpoint first")
    for name in fresh:
        p = model.get_parameter(name)
        _assign(model, name, torch.empty(p.shape, device=device, dtype=torch.float32 if is_adapter(name) else dtype))
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, BottleneckAdapter) and f"{prefix}fc1.weight" in fresh:
            m.reset_parameters()
        elif isinstance(m, VisionTransformer) and f"{prefix}proj" in fresh:
            nn.init.normal_(m.proj, std=m.cfg.width ** -0.5)
        elif isinstance(m, VisualMemory) and f"{prefix}p1" in fresh:
            m.reset_parameters()
    return model


def load_pretrained(cfg, vit_path=None, llm_path=None, device="cpu", dtype=torch.float32) -> nn.Module:
    """build(meta) -> load_backbones -> materialize: an LSRM with real frozen weights, only adapters trainable."""
    model = load_backbones(build(cfg, device="meta"), vit_path, llm_path, device, dtype)
    materialize(model, device, dtype)
    mark_only_adapters_trainable(model)
    return model


# ---------------------------------------------------------------------------------------------
# Back to Hugging Face (reference comparisons, benchmarks)

def to_hf_llama_state_dict(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our decoder's state dict (Meta names and rotary layout) -> LlamaForCausalLM's, q/k permuted."""
    ours_to_hf = {(r if isinstance(r, str) else r[0]): hf for hf, r in HF_LLAMA.items()}
    out = {}
    for key, w in sd.items():
        tmpl, i = _template(key)
        if tmpl not in ours_to_hf:
            raise WeightsError(f"{key!r} has no Hugging Face name")
        if tmpl.endswith("wq.weight"):
            w = permute_rotary(w, cfg.n_heads)
        elif tmpl.endswith("wk.weight"):
            w = permute_rotary(w, cfg.n_kv_heads)
        out[ours_to_hf[tmpl].format(i=i)] = w
    return out


def to_hf_llama_config(cfg: LlamaConfig) -> dict:
    """Keyword arguments for transformers.LlamaConfig describing the same decoder."""
    scaling = None
    if cfg.rope_scaling is not None:
        factor, low, high, old = cfg.rope_scaling
        scaling = dict(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=old)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, rope_scaling=scaling, tie_word_embeddings=cfg.tie_embeddings)


def to_hf_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT's state dict -> CLIPVisionModel's (weights.HF_CLIP read backwards; in_proj split in q, k, v)."""
    back: dict[str, list] = {}
    for hf, rule in HF_CLIP.items():
        ours, how = (rule, None) if isinstance(rule, str) else rule
        if how is None or isinstance(how, int):                        # skip visual_projection (no proj here)
            back.setdefault(ours, []).append((hf, how))
    out = {}
    for key, w in sd.items():
        tmpl, i = _template(key)
        for hf, piece in back.get(tmpl, ()):
            out[hf.format(i=i)] = w if piece is None else w.chunk(3)[piece]
    return out

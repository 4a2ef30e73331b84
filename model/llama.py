"""LLaMA-family decoder, written from scratch: LLaMA-1/2, Vicuna, LLaMA-3.x.

RMSNorm, rotary embeddings in Meta's convention (adjacent pairs rotate together, theta and LLaMA-3.1
frequency scaling configurable), grouped-query attention through `F.scaled_dot_product_attention`,
SwiGLU, tied or untied output head, and a KV cache for incremental decoding. Module names are Meta's
(`tok_embeddings`, `layers.{i}.attention.wq`, `feed_forward.w1`, `attention_norm`, `ffn_norm`, `norm`,
`output`), so a `consolidated.*.pth` loads as it is.

The one addition for MemVP/LSRM: each block's FFN accepts an optional visual-memory branch that reads
the normalised FFN input `u` and is added beside the FFN (`memory.py` implements it, paper eq. 3.3.1).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LlamaConfig

# memory(u) -> (B, T, D); called once per block, in order, so it can carry state (LSRM's M) down the stack
MemoryBranch = Callable[[torch.Tensor], torch.Tensor]
CACHE_ROOM = 64          # KV-cache positions past the prompt: ScienceQA's answer takes 4, a COCO caption up to 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()                                       # normalise in fp32, as Meta's code does
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (Meta's layout: dims (2i, 2i+1) of each head form one rotating pair)

def rope_frequencies(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) angular frequencies theta^(-2i/d), with LLaMA-3.1 scaling when configured."""
    d = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device)[: d // 2].float() / d))
    if cfg.rope_scaling is None:
        return freqs
    factor, low_ff, high_ff, old_len = cfg.rope_scaling
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)       # 0 at the low edge, 1 at the high
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    return torch.where(wavelen < old_len / high_ff, freqs,            # short wavelengths kept as they are
                       torch.where(wavelen > old_len / low_ff, freqs / factor, blended))


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, hd); freqs_cis (T, hd/2) complex e^{i·pos·freq}. Each adjacent pair (x0, x1) is read as
    the complex number x0 + i·x1 and rotated by one complex multiplication (Meta's code), in fp32."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))      # (B, T, H, hd/2) complex
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache_k: Optional[torch.Tensor] = None      # (B, KV, S, hd), allocated lazily on first use
        self.cache_v: Optional[torch.Tensor] = None
        self.max_seq_len = cfg.max_seq_len

    def _cached(self, k, v, start_pos: int):
        """Write k, v (B, KV, T, hd) at start_pos; return all keys/values up to start_pos + T. A new cache holds
        the prompt plus CACHE_ROOM tokens (up to max_seq_len), so decoding that many never reallocates; past
        that it grows by CACHE_ROOM at a time, keeping what it holds (doubling held twice the prompt's cache for
        a 4-token answer). Tokens at start_pos > 0 continue the cache of their own batch: any other is refused."""
        B, _, T, _ = k.shape
        end = start_pos + T
        c = self.cache_k
        same = c is not None and (c.shape[0], c.device, c.dtype) == (B, k.device, k.dtype)
        if start_pos > 0 and not (same and c.shape[2] >= start_pos):
            held = "nothing" if c is None else f"{c.shape[0]} rows of {c.shape[2]} positions ({c.dtype}, {c.device})"
            raise RuntimeError(f"KV cache: {B} rows at position {start_pos} ({k.dtype}, {k.device}) do not continue "
                               f"the cache, which holds {held}: reset_cache() and start at position 0")
        if not same or c.shape[2] < end:
            size = min(end + CACHE_ROOM, self.max_seq_len)          # forward() keeps end <= max_seq_len
            new_k = k.new_zeros(B, self.n_kv_heads, size, self.head_dim)
            new_v = torch.zeros_like(new_k)
            if start_pos > 0:                                # growing this batch's cache: keep its contents
                new_k[:, :, :start_pos] = c[:, :, :start_pos]
                new_v[:, :, :start_pos] = self.cache_v[:, :, :start_pos]
            self.cache_k, self.cache_v = new_k, new_v
        self.cache_k[:, :, start_pos:end] = k
        self.cache_v[:, :, start_pos:end] = v
        return self.cache_k[:, :, :end], self.cache_v[:, :, :end]

    def forward(self, x, freqs_cis, start_pos: int, use_cache: bool) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), freqs_cis)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                # (B, heads, T, hd)
        if use_cache:
            k, v = self._cached(k, v, start_pos)                        # (B, KV, start_pos + T, hd)
        if T == 1:
            mask, causal = None, False                                  # one new token sees everything
        elif k.shape[2] == T:
            mask, causal = None, True                                   # plain causal prefill
        else:                                                           # a chunk after a cached prefix
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs_cis, start_pos: int, use_cache: bool, memory: Optional[MemoryBranch]):
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, use_cache)   # Alg. 1 l.10
        u = self.ffn_norm(h)
        out = h + self.feed_forward(u)
        if memory is not None:                     # MemVP: the visual memory sits beside the FFN
            out = out + memory(u).to(out.dtype)    # Alg. 1 l.17: X_t <- X_fuse + FFN(X_t), X_fuse read from u
        return out


class Transformer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope: dict = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Random init for tiny from-scratch models (llama2.c's): N(0, 0.02), residual outputs scaled."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def rope(self, start: int, length: int, device) -> torch.Tensor:
        """freqs_cis (length, hd/2) complex, for positions start..start+length; cached per device."""
        end = start + length
        freqs_cis = self._rope.get(device)
        if freqs_cis is None or freqs_cis.shape[0] < end:
            n = max(end, self.cfg.max_seq_len)
            angles = torch.outer(torch.arange(n, device=device).float(), rope_frequencies(self.cfg, device))
            freqs_cis = torch.polar(torch.ones_like(angles), angles)                 # e^{i·angle}
            self._rope[device] = freqs_cis
        return freqs_cis[start:end]

    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, memory: Optional[MemoryBranch] = None,
                use_cache: bool = False, last_only: bool = False,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) at positions start_pos.. -> logits (B, T, V) in fp32 ((B, 1, V) if last_only).

        `positions` (n,), flat indices into B·T (training: the answer positions), gives their logits only,
        (n, V): the others are never needed, and at 7B all of them in fp32 are ~1 GB (~4 GB with LLaMA-3's
        128k vocabulary) per micro-batch, with as much again for their gradient."""
        B, T = tokens.shape
        if start_pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)                                  # (B, T, D); Alg. 1 l.3
        freqs_cis = self.rope(start_pos, T, tokens.device)
        for layer in self.layers:                                        # Alg. 1 l.9
            h = layer(h, freqs_cis, start_pos, use_cache, memory)
        if positions is not None:
            h = h.reshape(B * T, -1).index_select(0, positions)          # (n, D)
        elif last_only:
            h = h[:, -1:]                                                # (B, 1, D)
        return F.linear(self.norm(h), self.output_weight()).float()      # (B, T, V), (B, 1, V) or (n, V)

    def reset_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

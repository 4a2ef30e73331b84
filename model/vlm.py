"""The whole model: frozen ViT -> trainable visual memory -> frozen LLaMA.

Only the adapters train: the ViT bottleneck adapters, the projectors (with Λ) and P1/P2.
`build` makes a model on any device, including `meta` (no memory, for parameter counts and for
materialising real checkpoints without holding a 7B model twice).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from .config import Config
from .data import normalize
from .llama import Transformer
from .memory import VisualMemory, InheritableCrossAttention
from .vit import VisionTransformer


def is_adapter(name: str) -> bool:
    """The trainable parameters, by name: the visual memory (projectors, Λ, P1, P2) and the ViT adapters."""
    return name.startswith("memory.") or ".adapter." in name


class LSRM(nn.Module):
    """ViT -> visual memory -> decoder. One way to Z (`visual_memory`), one decoder pass reading it (`decode`),
    both in one call for training and scoring (`forward`), and greedy decoding (`generate`).

    `inheritable` says whether M is applied (Alg. 1 l.8, 14, 15): model state, set like `training`. It starts
    as lsrm.inheritable; the trainer sets it each epoch from lsrm.shift_epoch (train.inheritable_at), a
    checkpoint records it and loading restores it."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vit)
        self.llama = Transformer(cfg.llama)
        self.memory = VisualMemory(cfg)
        self.inheritable = cfg.lsrm.inheritable

    def visual_memory(self, batch: int, images: Optional[torch.Tensor] = None,
                      has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Z (B, N, D) for a batch of `batch` items: images (B, 3, H, W) read where has_image (B,) (default: every
        item), Z = 0 elsewhere and for every item when there are no images (only P1/P2 remain in the memory).
        uint8 pictures are normalised here, on their device, in float32 (train.preprocess's mean and std); float
        images are taken as normalised already.

        The ViT runs only on the items with a picture. Which those are is decided on the CPU: the trainer
        passes has_image there, so no step waits on the GPU."""
        if images is None:                              # a text-only batch
            return self.memory.p1.new_zeros(batch, self.cfg.lsrm.n_slots, self.cfg.llama.dim)
        images = normalize(images, self.cfg.train.preprocess)                   # (B, 3, H, W) float32
        keep = torch.ones(batch, dtype=torch.bool) if has_image is None else has_image.detach().cpu() > 0   # (B,)
        if keep.all():                                  # Alg. 1 l.5: the tapped layers, l.7: SRProj and mean
            return self.memory.encode(self.visual.patch_features(images, self.cfg.lsrm.taps))
        z = self.memory.p1.new_zeros(batch, self.cfg.lsrm.n_slots, self.cfg.llama.dim)
        if keep.any():
            idx = keep.nonzero()[:, 0].to(images.device)
            part = self.memory.encode(self.visual.patch_features(images[idx], self.cfg.lsrm.taps))
            z = z.index_put((idx.to(z.device),), part.to(z.dtype))
        return z

    def memory_read(self, z: torch.Tensor) -> InheritableCrossAttention:
        """The memory one decoder pass reads (K, V from Z; M applied if `inheritable`)."""
        return self.memory.read(z, inheritable=self.inheritable, training=self.training)

    def decode(self, tokens: torch.Tensor, z: torch.Tensor, *, start_pos: int = 0, use_cache: bool = False,
               last_only: bool = False, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decoder reading visual memory z (B, N, D): tokens (B, T) at positions start_pos.. -> logits
        (B, T, V), (B, 1, V) if last_only, or (n, V) at flat `positions` (training: the answer positions)."""
        # Alg. 1 l.3 (the embedding) and l.9-18 (every block, the memory read beside its FFN): model/llama.py
        return self.llama(tokens, start_pos=start_pos, memory=self.memory_read(z), use_cache=use_cache,
                          last_only=last_only, positions=positions)

    def forward(self, tokens: torch.Tensor, images: Optional[torch.Tensor] = None,
                has_image: Optional[torch.Tensor] = None, *, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Algorithm 1 whole: tokens (B, T) with their images (+ has_image), or none (a text-only batch) ->
        logits (B, T, V), or (n, V) at flat `positions`."""
        return self.decode(tokens, self.visual_memory(tokens.shape[0], images, has_image), positions=positions)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, z: Optional[torch.Tensor], max_new_tokens: int, eos_id: int,
                 on_token: Optional[Callable[[torch.Tensor], None]] = None,
                 stop: Optional[Callable[[list[int]], bool]] = None) -> list[list[int]]:
        """Greedy decoding with the KV cache. tokens (B, T): prompts of equal length; z (B, N, D) their visual
        memory, or None for the frozen decoder alone (no memory branch). A row ends at EOS, or once `stop`
        (given the row's new tokens so far) says so; the batch ends when every row has, or after max_new_tokens.
        on_token(next (B,)) sees each step's tokens. Returns each row's new tokens, EOS left out."""
        B, T = tokens.shape

        def step(toks: torch.Tensor, pos: int) -> torch.Tensor:
            if z is None:
                return self.llama(toks, start_pos=pos, use_cache=True, last_only=True)
            return self.decode(toks, z, start_pos=pos, use_cache=True, last_only=True)

        try:
            logits = step(tokens, 0)                                             # prefill (B, 1, V)
            out = torch.empty(B, 0, dtype=torch.long, device=tokens.device)
            done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
            for i in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1)                                   # (B,)
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                out = torch.cat([out, nxt[:, None]], 1)
                if on_token is not None:
                    on_token(nxt)
                done |= nxt == eos_id
                if stop is not None:
                    for b in (~done).nonzero().flatten().tolist():
                        done[b] = stop(out[b].tolist())
                if done.all() or T + i + 1 >= self.cfg.llama.max_seq_len:
                    break
                logits = step(nxt[:, None], T + i)
        finally:
            self.llama.reset_cache()                     # however it ends: the next call starts a fresh cache
        return [[t for t in row if t != eos_id] for row in out.tolist()]


def mark_only_adapters_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: the checkpoint of a fine-tuned model is a few MB even at 13B."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter(n)}


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Frozen weights in `dtype` (bf16/fp16 on GPU), trainable ones kept in fp32."""
    for name, p in model.named_parameters():
        if not is_adapter(name):
            p.data = p.data.to(dtype)
    return model


def build(cfg: Config, device: str | torch.device = "cpu") -> LSRM:
    """A model with random frozen weights and freshly initialised adapters, only adapters trainable."""
    with torch.device(device):
        model = LSRM(cfg)
    mark_only_adapters_trainable(model)
    return model


def param_groups(model: nn.Module) -> dict[str, dict[str, int]]:
    """Parameter counts by group (works on the meta device): the paper's '#Param trainable' column."""
    groups: dict[str, dict[str, int]] = {}

    def group_of(name: str) -> str:
        if name in ("memory.p1", "memory.p2"):
            return "memory positions P1/P2"
        if name.startswith("memory.projectors"):
            return "projectors (incl. Λ)"
        if ".adapter." in name:
            return "ViT adapters"
        return "frozen ViT" if name.startswith("visual.") else "frozen LLM"

    for name, p in model.named_parameters():
        g = groups.setdefault(group_of(name), {"trainable": 0, "total": 0})
        g["total"] += p.numel()
        g["trainable"] += p.numel() if p.requires_grad else 0
    return groups

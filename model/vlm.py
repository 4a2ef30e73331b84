"""The whole model: frozen ViT -> trainable visual memory -> frozen LLaMA.

Only the adapters train: the ViT bottleneck adapters, the projectors (with Λ) and P1/P2.
`build` makes a model on any device, including `meta` (no memory, for parameter counts and for
materialising real checkpoints without holding a 7B model twice).
"""
from __future__ import annotations

from typing import Optional

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
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vit)
        self.llama = Transformer(cfg.llama)
        self.memory = VisualMemory(cfg)
        self.inheriting = cfg.lsrm.inheritable    # M applied (Algorithm 1, l. 8, 14, 15): see inherit()

    def inherit(self, on: bool = True) -> "LSRM":
        """Apply M from now on, or not: model state, set like train()/eval(). The trainer turns it on from
        lsrm.shift_epoch; a checkpoint records it ("inheritable_used") and loading restores it."""
        self.inheriting = bool(on)
        return self

    def encode_images(self, images: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), has_image (B,) -> visual memory Z (B, N, D). uint8 pictures are normalised here, on
        their device, in float32 (train.preprocess's mean and std); float images are taken as normalised already.

        Items without an image get Z = 0 (only P1/P2 remain), so the ViT runs only on those with one. Which
        those are is decided on the CPU: the trainer passes has_image there, so no step waits on the GPU."""
        images = normalize(images, self.cfg.train.preprocess)               # (B, 3, H, W) float32
        keep = has_image.detach().cpu() > 0                                  # (B,) bool, on the CPU
        flags = has_image.to(images.device)
        if keep.all():
            return self.memory.encode(self.visual.patch_features(images, self.cfg.lsrm.taps), flags)
        z = self.memory.empty(images.shape[0])
        if keep.any():
            idx = keep.nonzero()[:, 0].to(images.device)
            part = self.memory.encode(self.visual.patch_features(images[idx], self.cfg.lsrm.taps), flags[idx])
            z = z.index_put((idx.to(z.device),), part.to(z.dtype))
        return z

    def visual_memory(self, batch: int, images: Optional[torch.Tensor] = None,
                      has_image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Z (B, N, D) for a batch of `batch` items: from the images where has_image (default: every item),
        empty (P1/P2 only) elsewhere, or for every item when there are no images."""
        if images is None:
            return self.memory.empty(batch)
        if has_image is None:
            has_image = torch.ones(batch, device=images.device)
        return self.encode_images(images, has_image)

    def memory_read(self, z: torch.Tensor) -> InheritableCrossAttention:
        return self.memory.read(z, inheritable=self.inheriting, training=self.training)

    def forward(self, tokens: torch.Tensor, images: Optional[torch.Tensor] = None,
                has_image: Optional[torch.Tensor] = None, *, z: Optional[torch.Tensor] = None,
                start_pos: int = 0, use_cache: bool = False, last_only: bool = False,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or (n, V) at flat `positions` (training: the answer positions).
        Give images (+ has_image), or a precomputed z, or neither (a text-only batch)."""
        if z is None:
            z = self.visual_memory(tokens.shape[0], images, has_image)
        read = self.memory_read(z)
        return self.llama(tokens, start_pos=start_pos, memory=read, use_cache=use_cache, last_only=last_only,
                          positions=positions)


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

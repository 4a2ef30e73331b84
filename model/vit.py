"""CLIP-shaped vision encoder, written from scratch.

The module names are those of openai/CLIP's `VisionTransformer` (`conv1`, `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.{i}.attn/ln_1/mlp/ln_2`, `ln_post`, `proj`),
so an OpenAI checkpoint's `visual.*` tensors load without renaming. Each block also carries MemVP's
trainable bottleneck adapter (zero-initialised up-projection), the only trainable part of the ViT.

LSRM reads the hidden states after chosen blocks (multilevel fusion, paper §3.1): `forward` returns
them and runs no block past the deepest one requested (for ViT-L/14 the last block never runs).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ViTConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype (as openai/CLIP does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (the layout of nn.MultiheadAttention)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)            # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        y = F.scaled_dot_product_attention(q, k, v)                           # (B, H, L, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class BottleneckAdapter(nn.Module):
    """MemVP's ViT adapter: 0.1 * fc2(dropout(gelu(fc1(x)))), no bias, fc2 zero-initialised."""

    def __init__(self, width: int, dim: int, scale: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, dim, bias=False)
        self.fc2 = nn.Linear(dim, width, bias=False)
        self.drop = nn.Dropout(dropout)
        self.scale = scale

    @torch.no_grad()
    def reset_parameters(self):                  # fc2 = 0: the adapted ViT starts equal to the frozen one
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x):                        # trainable fp32 beside frozen bf16/fp16 weights
        return (self.scale * self.fc2(self.drop(F.gelu(self.fc1(x.to(self.fc1.weight.dtype)))))).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width)
        self.adapter = (BottleneckAdapter(cfg.width, cfg.adapter_dim, cfg.adapter_scale, cfg.adapter_dropout)
                        if cfg.adapters else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        u = self.ln_2(x)
        x = x + self.mlp(u)
        if self.adapter is not None:           # x = x + mlp(ln_2(x)) + 0.1 * fc2(drop(gelu(fc1(ln_2(x)))))
            x = x + self.adapter(u)
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.n_patches + 1, w))
        self.ln_pre = LayerNorm(w, eps=cfg.eps)
        self.transformer = Transformer(cfg)
        self.ln_post = LayerNorm(w, eps=cfg.eps)
        self.proj = nn.Parameter(torch.empty(w, cfg.output_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """openai/CLIP's initialisation; adapters' up-projection zero so the adapted ViT starts frozen-equal."""
        w, L = self.cfg.width, self.cfg.layers
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * L) ** -0.5, (2 * w) ** -0.5
        nn.init.normal_(self.conv1.weight, std=0.02)
        nn.init.normal_(self.class_embedding, std=w ** -0.5)
        nn.init.normal_(self.positional_embedding, std=w ** -0.5)
        nn.init.normal_(self.proj, std=w ** -0.5)
        for blk in self.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(blk.attn.in_proj_bias)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.out_proj.bias)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(blk.mlp.c_fc.bias)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(blk.mlp.c_proj.bias)
            if blk.adapter is not None:
                blk.adapter.reset_parameters()

    def forward(self, images: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> [hidden state after block t for t in taps], each (B, 1 + P, Dv).

        Raw residual-stream states (CLS first); `patch_features` gives what the visual memory reads.
        images are normalised floats: uint8 pictures go through data.normalize first (LSRM.visual_memory does).
        """
        if not images.is_floating_point():
            raise TypeError(f"the ViT takes normalised float images, got {images.dtype}: see data.normalize")
        x = self.conv1(images.to(self.conv1.weight.dtype))                    # (B, Dv, g, g)
        x = x.flatten(2).transpose(1, 2)                                        # (B, P, Dv)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)        # (B, 1, Dv)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + P, Dv)
        x = self.ln_pre(x)
        out = {}
        for i, blk in enumerate(self.transformer.resblocks[: max(taps) + 1]):  # nothing past the deepest tap
            x = blk(x)
            if i in taps:
                out[i] = x
        return [out[t] for t in taps]

    def patch_features(self, images: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
        """X_v^l for each tapped block l: ln_post of its patch tokens, CLS dropped, each (B, P, Dv)."""
        return [self.ln_post(h[:, 1:]) for h in self(images, taps)]

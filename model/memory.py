"""The visual memory (MemVP) and LSRM's three components (paper §3), in the order of the paper's Algorithm 1:
the projectors and their mean (Z), K and V, then the inheritable cross-attention that reads them.

Each line that does a step of the algorithm carries its tag, "Alg. 1 l.N", with its equation; the table in
README.md maps the paper to the code, docs/equations.md writes the equations out. Alg. 1 l.5 (the ViT's tapped
layers) is in model/vlm.py; l.3, l.9, l.10 and l.17 (the text embedding, the loop over the decoder blocks,
each block's attention, and its FFN beside which the memory is added) in model/llama.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, LSRMConfig


class Projector(nn.Module):
    """MemVP's projector fc2(SiLU(fc1 x)) (eq. 3.2.1; its scale λ is the fixed `feature_scale`), or with
    `srproj` LSRM's semantic relationship projector fc2(Λ ⊙ SiLU(fc1 x)) (eq. 3.2.2), Λ = diag(λ_1..λ_dh)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, srproj: bool):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        # Λ is stored as its diagonal, initialised to ones so SRProj starts equal to the plain projector
        self.Lambda = nn.Parameter(torch.ones(d_hidden)) if srproj else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for fc in (self.fc1, self.fc2):                   # as MemVP: xavier-uniform weights, zero biases
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        if self.Lambda is not None:
            nn.init.ones_(self.Lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, P, d_in) -> (B, P, d_out)
        h = F.silu(self.fc1(x))                           # (B, P, d_h)
        if self.Lambda is not None:
            h = h * self.Lambda                           # Λ · SiLU(X W1): scales each hidden unit
        return self.fc2(h)


class VisualMemory(nn.Module):
    """All LLM-side trainable parameters: one projector per tapped ViT layer, and P1, P2 (1, N, D)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg.lsrm
        D, N = cfg.llama.dim, cfg.lsrm.n_slots
        self.projectors = nn.ModuleList(
            Projector(cfg.vit.width, cfg.lsrm.proj_hidden, D, cfg.lsrm.srproj) for _ in cfg.lsrm.taps)
        self.p1 = nn.Parameter(torch.empty(1, N, D))      # key positions
        self.p2 = nn.Parameter(torch.empty(1, N, D))      # value positions
        self.reset_positions()                            # the projectors initialised themselves

    @torch.no_grad()
    def reset_positions(self):
        nn.init.normal_(self.p1, std=0.02)
        nn.init.zeros_(self.p2)                           # V = 0 for no image: starts at the frozen LLM

    def reset_parameters(self):
        self.reset_positions()
        for proj in self.projectors:
            proj.reset_parameters()

    def project(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """SRProj_l(X_v^l) for each tapped layer l: (B, P, Dv) -> (B, P, D) each, in the projectors' fp32."""
        return [proj(x.to(proj.fc1.weight.dtype)) for proj, x in zip(self.projectors, feats)]

    def encode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: one (B, P, Dv) per tapped layer, of items that have a picture -> Z (B, N, D). LSRM.visual_memory
        calls it (items without a picture get Z = 0 there)."""
        # Alg. 1 l.7, eq. 3.2.3: X_v = 1/L Σ_l SRProj_l(X_v^l). (The released code sums, not averages.)
        z = self.cfg.feature_scale * torch.stack(self.project(feats)).mean(0)     # (B, P, D)
        return F.pad(z, (0, 0, 0, self.cfg.n_slots - z.shape[1]))              # (B, N, D): extra slots = 0

    def read(self, z: torch.Tensor, inheritable: bool, training: bool) -> InheritableCrossAttention:
        """The memory one forward pass reads, Z (B, N, D) with its positions."""
        # Alg. 1 l.11, eq. 3.3.2: K = X_v + P1, V = X_v + P2 (Q, the FFN's input u, comes from each block)
        return InheritableCrossAttention(z + self.p1, z + self.p2, self.cfg, inheritable, training)


def n_lowest(delta: float, n: int) -> int:
    """k = floor(δ·N), robust to float error (0.29 * 100 is 28.999...)."""
    return math.floor(round(delta * n, 6))


def lowest_indices(alpha: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k smallest entries in each row of alpha (..., N), by selection (topk), not a sort.

    Exactly k per row. Ties at the k-th value are broken by topk, i.e. arbitrarily. (The released code
    decays the entries strictly below the k-th smallest value instead: k-1 of them when all differ.)
    """
    return alpha.detach().topk(k, dim=-1, largest=False, sorted=False).indices   # integer indices: no gradient


@torch.no_grad()
def lowest_mask(alpha: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (..., N) of the k smallest entries in each row: "α_ij ∈ lowest δ% of α_i"."""
    mask = torch.zeros_like(alpha, dtype=torch.bool)
    if k <= 0:
        return mask
    return mask.scatter_(-1, lowest_indices(alpha, k), True)


def decay_lowest(M: torch.Tensor, alpha: torch.Tensor, delta: float, decay: float) -> torch.Tensor:
    """Alg. 1 l.14, eq. 3.3.3: M_ij <- λ M_ij where α_ij is among the lowest δ% of row α_i, else M_ij; λ is
    `decay` (lsrm.decay). The lowest are read from α itself, not from α ⊙ M. No gradient: only the indices of
    α are used, and M (all ones to begin with) never requires one. Out of place: the previous block keeps its
    M for backward."""
    lowest = lowest_mask(alpha, n_lowest(delta, alpha.shape[-1]))     # (B, T, N) bool
    return torch.where(lowest, decay * M, M)


class InheritableCrossAttention:
    """The paper's inheritable cross-attention (§3.3) for ONE forward pass: each decoder block calls this object
    once, in order (Alg. 1 l.9), with its FFN input u = ffn_norm(h) as Q, and M is carried from block to block.

    As MemVP, α' is dropped out in training and X_fuse scaled by s = fusion_scale (neither is in the paper).
    Without `inheritable` (MemVP, or before shift_epoch) l.8, 14 and 15 are skipped. (l.12 is the algorithm's
    heading "▷ Inheritable Cross-Attention", no step.) Every row (text token) is independent, so incremental
    decoding with a KV cache reproduces the full pass's M uncached.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, cfg: LSRMConfig, inheritable: bool, training: bool):
        self.k, self.v = k, v                            # (B, N, D) each
        self.cfg, self.inheritable, self.training = cfg, inheritable, training
        self.M: torch.Tensor | None = None               # (B, T, N), fp32; None until the first block
        self.history: list[torch.Tensor] | None = None   # set to [] to record M after each block

    def __call__(self, u: torch.Tensor) -> torch.Tensor:  # u (B, T, D) -> (B, T, D)
        if self.k.dtype != u.dtype:                       # once, at the first block (bf16 under autocast): one copy
            self.k, self.v = self.k.to(u.dtype), self.v.to(u.dtype)   # kept for backward, not one per block
        k, v = self.k, self.v
        alpha = F.silu(u @ k.transpose(1, 2))             # Alg. 1 l.13, eq. 3.3.1: no 1/sqrt(d), no softmax (B, T, N)
        if self.inheritable:
            if self.M is None:                            # Alg. 1 l.8: M = 1
                self.M = torch.ones(alpha.shape, dtype=torch.float32, device=alpha.device)
            self.M = decay_lowest(self.M, alpha, self.cfg.delta, self.cfg.decay)     # Alg. 1 l.14, eq. 3.3.3
            alpha = alpha * self.M.to(alpha.dtype)        # Alg. 1 l.15, eq. 3.3.4: α' = α ⊙ M
            if self.history is not None:
                self.history.append(self.M)
        alpha = F.dropout(alpha, self.cfg.dropout, self.training)
        return self.cfg.fusion_scale * (alpha @ v)        # Alg. 1 l.16: X_fuse = s · α' V   (B, T, D)

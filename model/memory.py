"""The visual memory (MemVP) and LSRM's three components (paper §3).

    feats_l (B, P, Dv) for each tapped ViT layer l                     VisualMemory.encode
      -> SRProj_l                      one projector per layer            eq. 3.2.2   Projector
      -> mean over l                   multilevel information fusion      eq. 3.2.3 / 3.2.4
      -> Z = 0.01 * ..., padded to N   the visual memory                  (B, N, D)
    in every decoder block, with u = ffn_norm(h) (B, T, D):               InheritableCrossAttention
      K = Z + P1, V = Z + P2                                             eq. 3.3.2   (Algorithm 1, l. 11)
      A = SiLU(u K^T)                                                    eq. 3.3.1   (l. 13)
      M <- λ M on the lowest δ·N entries of each row of A                 eq. 3.3.3   (l. 14; inherited)
      out = h + FFN(u) + s * dropout(M ⊙ A) V                            eq. 3.3.4   (l. 15-17)
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


def n_lowest(delta: float, n: int) -> int:
    """k = floor(δ·N), robust to float error (0.29 * 100 is 28.999...)."""
    return math.floor(round(delta * n, 6))


def lowest_indices(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k smallest entries in each row of a (..., N), by selection (topk), not a sort.

    Exactly k per row. Ties at the k-th value are broken by topk, i.e. arbitrarily. (The released code
    decays the entries strictly below the k-th smallest value instead: k-1 of them when all differ.)
    """
    return a.detach().topk(k, dim=-1, largest=False, sorted=False).indices      # integer indices: no gradient


@torch.no_grad()
def lowest_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (..., N) of the k smallest entries in each row: "α_ij ∈ lowest δ% of α_i"."""
    mask = torch.zeros_like(a, dtype=torch.bool)
    if k <= 0:
        return mask
    return mask.scatter_(-1, lowest_indices(a, k), True)


def decay(M: torch.Tensor, a: torch.Tensor, delta: float, lam: float) -> torch.Tensor:
    """Eq. 3.3.3: M_ij <- λ M_ij where a_ij is among the lowest δ% of row a_i, else M_ij. No gradient: only
    the indices of a are used, and M (all ones to begin with) never requires one. Out of place: the
    previous block keeps its M for backward."""
    lowest = lowest_mask(a, n_lowest(delta, a.shape[-1]))     # (B, T, N) bool
    return torch.where(lowest, lam * M, M)


class InheritableCrossAttention:
    """The paper's inheritable cross-attention (§3.3) for ONE forward pass: Algorithm 1, lines 8-17.

         8: Initialize: M = 1 (T x N)                   here (B, T, N) fp32, made at the first block
         9: for Layer in LLM do                         each decoder block calls this object once, in order
        10:   X_t <- Layer.Attn(X_t)                    in the block (model/llama.py)
        11:   Q <- X_t, K <- X_v + P1, V <- X_v + P2    Q = u = ffn_norm(h); K, V made once by VisualMemory.read
        13:   α <- SiLU(Q K^T)
        14:   M_ij <- λ M_ij if α_ij is among the lowest δ% of α_i, else M_ij
        15:   α' <- α ⊙ M
        16:   X_fuse <- α' V
        17:   X_t <- X_fuse + Layer.FFN(X_t)            in the block: out = h + FFN(u) + X_fuse
        18: end for

    Lines 3-7 (the ViT's two layers, SRProj, their mean) are LSRM.encode_images and VisualMemory.encode.
    As MemVP, α' is dropped out in training and X_fuse scaled by s = fusion_scale (neither is in the paper).
    Without `inheritable` (MemVP, or before shift_epoch) lines 8, 14 and 15 are skipped. Every row (text
    token) is independent, so incremental decoding with a KV cache reproduces the full pass's M uncached.
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
        a = F.silu(u @ k.transpose(1, 2))                 # 13: α = SiLU(Q K^T), no 1/sqrt(d), no softmax  (B, T, N)
        if self.inheritable:
            if self.M is None:                            # 8: M = 1
                self.M = torch.ones(a.shape, dtype=torch.float32, device=a.device)
            self.M = decay(self.M, a, self.cfg.delta, self.cfg.decay)      # 14: λM on the lowest δ% of each row
            a = a * self.M.to(a.dtype)                    # 15: α' = α ⊙ M   (eq. 3.3.4)
            if self.history is not None:
                self.history.append(self.M)
        a = F.dropout(a, self.cfg.dropout, self.training)
        return self.cfg.fusion_scale * (a @ v)            # 16: X_fuse = s · α' V   (B, T, D)


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

    def encode(self, feats: list[torch.Tensor], has_image: torch.Tensor) -> torch.Tensor:
        """feats: one (B, P, Dv) per tapped layer; has_image (B,) -> Z (B, N, D)."""
        # Multilevel fusion, eq. 3.2.3: X_v = 1/L Σ_l SRProj_l(X_v^l). (The released code sums, not averages.)
        z = torch.stack(self.project(feats)).mean(0)
        z = self.cfg.feature_scale * z * has_image.to(z.dtype)[:, None, None]     # (B, P, D)
        return F.pad(z, (0, 0, 0, self.cfg.n_slots - z.shape[1]))              # (B, N, D): extra slots = 0

    def empty(self, batch: int) -> torch.Tensor:
        """Z for items with no image: only P1/P2 remain in the memory."""
        return self.p1.new_zeros(batch, self.cfg.n_slots, self.p1.shape[-1])

    def read(self, z: torch.Tensor, inheritable: bool, training: bool) -> InheritableCrossAttention:
        return InheritableCrossAttention(z + self.p1, z + self.p2, self.cfg, inheritable, training)   # eq. 3.3.2

"""Property tests for LSRM's pieces: the M decay, the lowest-δ selection, the Λ projector, and the invariants
of Algorithm 1's inheritable cross-attention for any scores (ties, raw α, independent rows)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model.config import LSRMConfig
from model.memory import InheritableCrossAttention, Projector, decay_lowest, lowest_mask, n_lowest

SETTINGS = settings(max_examples=60, deadline=None)


def distinct_scores(shape, seed, dtype=torch.float32):
    """Scores with distinct values in every row, exactly representable in bf16 (small integers / 4)."""
    g = torch.Generator().manual_seed(seed)
    *lead, n = shape
    rows = torch.stack([torch.randperm(n, generator=g) for _ in range(math.prod(lead))])
    return ((rows.float() - n / 2) / 4).reshape(shape).to(dtype)


def reference_lowest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest of each row by a full sort: the slow, obvious definition."""
    order = a.float().argsort(dim=-1)
    mask = torch.zeros_like(a, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :k], True)


# ---------------------------------------------------------------------------------------------
# lowest-δ selection

@SETTINGS
@given(B=st.integers(1, 3), T=st.integers(1, 6), N=st.integers(1, 200), delta=st.floats(0, 1),
       seed=st.integers(0, 2 ** 16), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_lowest_selection_count_and_order(B, T, N, delta, seed, dtype):
    a = distinct_scores((B, T, N), seed, dtype)
    k = n_lowest(delta, N)
    mask = lowest_mask(a, k)
    assert k == math.floor(delta * N + 1e-9)
    assert (mask.sum(-1) == k).all()                              # exactly floor(δN) per row
    sel = torch.where(mask, a.float(), -math.inf).amax(-1)        # largest selected value per row
    uns = torch.where(mask, math.inf, a.float()).amin(-1)         # smallest unselected value per row
    assert (sel <= uns).all()                                     # every selected ≤ every unselected
    assert torch.equal(mask, reference_lowest(a, k))              # the same set as a full sort's


def test_lowest_k_is_floor_and_robust_to_float_error():
    assert n_lowest(0.3, 320) == 96
    assert n_lowest(0.29, 100) == 29          # 0.29 * 100 == 28.999999999999996 in floating point
    assert n_lowest(0.3, 3) == 0 and n_lowest(1.0, 7) == 7


# ---------------------------------------------------------------------------------------------
# M decay (eq. 3.3.3) across blocks

@SETTINGS
@given(B=st.integers(1, 2), T=st.integers(1, 5), N=st.integers(1, 64), L=st.integers(1, 8),
       delta=st.floats(0, 1), decay=st.floats(0.05, 1.0), seed=st.integers(0, 2 ** 16))
def test_m_decay_counts(B, T, N, L, delta, decay, seed):
    scores = [distinct_scores((B, T, N), seed + l) for l in range(L)]
    k = n_lowest(delta, N)
    M = torch.ones(B, T, N)
    count = torch.zeros(B, T, N)
    history = []
    for a in scores:
        M = decay_lowest(M, a, delta, decay)
        count += reference_lowest(a, k).float()
        history.append(M)
    torch.testing.assert_close(M, torch.full_like(M, decay) ** count, rtol=1e-5, atol=0)   # M = λ^c
    assert (M > 0).all() and (M <= 1).all()
    for before, after in zip(history, history[1:]):
        assert (after <= before).all()                              # non-increasing block to block


@SETTINGS
@given(N=st.integers(1, 50), L=st.integers(1, 5), delta=st.floats(0, 1), decay=st.floats(0.05, 1.0),
       seed=st.integers(0, 2 ** 16))
def test_m_stays_ones_when_nothing_decays(N, L, delta, decay, seed):
    for d, l in ((0.0, decay), (delta, 1.0)):                       # δ = 0, or λ = 1
        M = torch.ones(2, 3, N)
        for i in range(L):
            M = decay_lowest(M, distinct_scores((2, 3, N), seed + i), d, l)
        assert torch.equal(M, torch.ones(2, 3, N))


def test_decay_carries_no_gradient():
    a = torch.randn(2, 3, 10, requires_grad=True)
    M = decay_lowest(torch.ones(2, 3, 10), torch.nn.functional.silu(a), 0.3, 0.85)
    assert not M.requires_grad


# ---------------------------------------------------------------------------------------------
# Λ projector (SRProj, eq. 3.2.2)

@SETTINGS
@given(B=st.integers(1, 3), P=st.integers(1, 9), Dv=st.integers(1, 24), H=st.integers(1, 16),
       D=st.integers(1, 24), seed=st.integers(0, 2 ** 16))
def test_srproj_shapes_identity_and_gradient(B, P, Dv, H, D, seed):
    torch.manual_seed(seed)
    sr, plain = Projector(Dv, H, D, srproj=True), Projector(Dv, H, D, srproj=False)
    assert sr.Lambda.shape == (H,) and plain.Lambda is None
    plain.load_state_dict({k: v for k, v in sr.state_dict().items() if k != "Lambda"})
    x = torch.randn(B, P, Dv)
    y = sr(x)
    assert y.shape == (B, P, D)
    assert torch.equal(y, plain(x))                                  # Λ = 1 is exactly MemVP's projector
    y.square().sum().backward()
    assert sr.Lambda.grad is not None and sr.Lambda.grad.abs().sum() > 0


def test_lambda_scales_hidden_units():
    torch.manual_seed(0)
    sr = Projector(5, 4, 3, srproj=True)
    x = torch.randn(2, 7, 5)
    with torch.no_grad():
        sr.Lambda.copy_(torch.tensor([2.0, 0.0, 1.0, -1.0]))
        expected = sr.fc2(torch.nn.functional.silu(sr.fc1(x)) * sr.Lambda)
    torch.testing.assert_close(sr(x), expected)


@pytest.mark.parametrize("srproj", [True, False])
def test_projector_init(srproj):
    p = Projector(16, 8, 12, srproj)
    assert torch.equal(p.fc1.bias, torch.zeros(8)) and torch.equal(p.fc2.bias, torch.zeros(12))
    if srproj:
        assert torch.equal(p.Lambda, torch.ones(8))


# ---------------------------------------------------------------------------------------------
# Invariants of Algorithm 1 that hold for any scores (Hypothesis)

def tied_scores(kind: str, shape, seed: int, dtype) -> torch.Tensor:
    """Scores with ties: one value per row ("constant"), a few values ("few"), or distinct fp32 values that
    round to the same bf16 number ("bf16": 1 + i·1e-4, all 1.0 in bf16)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "constant":
        return torch.randn(*shape[:-1], 1, generator=g).expand(shape).contiguous().to(dtype)
    if kind == "few":
        return (torch.randint(0, 3, shape, generator=g).float() / 4).to(dtype)
    return (1 + torch.rand(shape, generator=g) * 1e-4 * shape[-1]).to(dtype)


@SETTINGS
@given(kind=st.sampled_from(["constant", "few", "bf16"]), B=st.integers(1, 3), T=st.integers(1, 5),
       N=st.integers(1, 120), delta=st.floats(0, 1), decay=st.floats(0.05, 0.99), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_ties_still_select_exactly_k_per_row(kind, B, T, N, delta, decay, seed, dtype):
    """Constant rows and bf16 ties: still exactly k = floor(δN) selected per row, none above an unselected one,
    and the decay multiplies exactly those k entries of M by λ."""
    a = tied_scores(kind, (B, T, N), seed, dtype)
    k = n_lowest(delta, N)
    mask = lowest_mask(a, k)
    assert (mask.sum(-1) == k).all()
    sel = torch.where(mask, a.float(), -math.inf).amax(-1)
    uns = torch.where(mask, math.inf, a.float()).amin(-1)
    assert (sel <= uns).all()
    M = decay_lowest(torch.ones(B, T, N), a, delta, decay)
    assert ((M < 1).sum(-1) == k).all() and torch.equal(M[M < 1], torch.full_like(M[M < 1], decay))


def run_blocks(us: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, cfg: LSRMConfig):
    """One forward pass's inheritable cross-attention over len(us) blocks: (M after each block, outputs)."""
    read = InheritableCrossAttention(k, v, cfg, inheritable=True, training=False)
    read.history = []
    outs = [read(u) for u in us]
    return read.history, outs


def memory_case(B, T, N, D, L, seed):
    g = torch.Generator().manual_seed(seed)
    us = [torch.randn(B, T, D, generator=g) for _ in range(L)]
    return us, torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)


@SETTINGS
@given(B=st.integers(1, 2), T=st.integers(1, 6), N=st.integers(2, 48), D=st.integers(1, 16), L=st.integers(2, 6),
       delta=st.floats(0.05, 0.95), decay=st.floats(0.05, 0.95), seed=st.integers(0, 2 ** 16))
def test_each_block_decays_the_lowest_of_the_raw_scores_not_of_the_decayed_ones(B, T, N, D, L, delta, decay, seed):
    """Alg. 1 l.14 before l.15: a block's lowest δ% are those of its own α = SiLU(Q Kᵀ), not of α ⊙ M (which
    would decay again what earlier blocks decayed). M after block l is λ^(times each entry was among the lowest
    of the raw α so far), and each block's output is s · (α ⊙ M) V."""
    us, k, v = memory_case(B, T, N, D, L, seed)
    cfg = LSRMConfig(n_slots=N, delta=delta, decay=decay, dropout=0.0, fusion_scale=0.5)
    history, outs = run_blocks(us, k, v, cfg)
    count = torch.zeros(B, T, N)
    for u, M, out in zip(us, history, outs):
        alpha = torch.nn.functional.silu(u @ k.transpose(1, 2))
        count += reference_lowest(alpha, n_lowest(delta, N)).float()
        torch.testing.assert_close(M, torch.full_like(M, decay) ** count, rtol=1e-6, atol=0)
        torch.testing.assert_close(out, 0.5 * (alpha * M) @ v, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(B=st.integers(1, 2), T=st.integers(2, 8), N=st.integers(2, 40), D=st.integers(1, 16), L=st.integers(1, 5),
       delta=st.floats(0, 1), decay=st.floats(0.05, 1.0), seed=st.integers(0, 2 ** 16), data=st.data())
def test_every_row_of_m_is_its_own_text_token(B, T, N, D, L, delta, decay, seed, data):
    """Rows never mix: the same tokens in another order, or only some of them, give the same rows of M and of
    the memory's output (what lets a KV cache decode token by token with the full pass's M)."""
    us, k, v = memory_case(B, T, N, D, L, seed)
    cfg = LSRMConfig(n_slots=N, delta=delta, decay=decay, dropout=0.0)
    history, outs = run_blocks(us, k, v, cfg)
    rows = data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=T, unique=True))   # some rows, any order
    sub_history, sub_outs = run_blocks([u[:, rows] for u in us], k, v, cfg)
    for M, sub_M, out, sub_out in zip(history, sub_history, outs, sub_outs):
        torch.testing.assert_close(sub_M, M[:, rows], rtol=1e-6, atol=0)
        torch.testing.assert_close(sub_out, out[:, rows], rtol=1e-5, atol=1e-6)

"""Invariants of the whole model at tiny size: what must hold for LSRM to be the method it claims."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import get_config
from model.config import apply_overrides, ladder
from model.memory import InheritableCrossAttention
from model.vit import VisionTransformer
from model.vlm import adapter_state_dict, build, cast_frozen, is_adapter


def tiny(**lsrm):
    cfg = get_config("tiny")
    for k, v in lsrm.items():
        setattr(cfg.lsrm, k, v)
    return cfg


def batch(cfg, B=3, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.llama.vocab_size, (B, T), generator=g)
    images = torch.randn(B, 3, cfg.vit.image_size, cfg.vit.image_size, generator=g)
    return tokens, images


def trained_like(model, seed=1):
    """Perturb every adapter parameter, as training would, so no zero-init hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if is_adapter(n):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_only_adapters_train():
    model = build(get_config("tiny"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model))
    assert all(n.startswith("memory.") or ".adapter." in n for n in trainable)
    assert any(".Lambda" in n for n in trainable) and "memory.p1" in trainable and "memory.p2" in trainable
    tokens, images = batch(model.cfg)
    model(tokens, images).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= trainable and "memory.p2" in with_grad


@pytest.mark.parametrize("inheritable", [False, True])
def test_no_image_fresh_adapters_equal_frozen_decoder(inheritable):
    """P2 = 0 and Z = 0 for an item without an image: V = 0, so the memory adds exactly nothing."""
    torch.manual_seed(0)
    model = build(tiny(inheritable=inheritable)).eval()
    tokens, images = batch(model.cfg)
    has_image = torch.tensor([0.0, 0.0, 0.0])
    with torch.no_grad():
        assert torch.equal(model(tokens, images, has_image), model.llama(tokens))
        assert torch.equal(model(tokens), model.llama(tokens))                    # text-only batch


def test_zero_init_vit_adapters_leave_features_unchanged():
    cfg = get_config("tiny").vit
    torch.manual_seed(0)
    adapted = VisionTransformer(cfg)
    plain = VisionTransformer(dataclasses.replace(cfg, adapters=False))
    missing, unexpected = plain.load_state_dict(adapted.state_dict(), strict=False)
    assert not missing and all(".adapter." in k for k in unexpected)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    taps = [1, 3, 4]
    for a, b in zip(adapted.train()(images, taps), plain.train()(images, taps)):   # even with dropout on
        assert torch.equal(a, b)


def test_vit_runs_no_block_past_the_deepest_tap():
    vit = VisionTransformer(get_config("tiny").vit)
    ran = []
    for i, blk in enumerate(vit.transformer.resblocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    out = vit(torch.randn(1, 3, 32, 32), [3, 1])
    assert ran == [0, 1, 2, 3] and [o.shape for o in out] == [(1, 65, 64)] * 2


def test_kv_cache_decoding_equals_full_forward_with_inheritable_on():
    torch.manual_seed(0)
    model = trained_like(build(tiny(inheritable=True))).eval()
    tokens, images = batch(model.cfg, B=2, T=24)
    with torch.no_grad():
        z = model.visual_memory(2, images)
        full = model.decode(tokens, z)
        model.llama.reset_cache()
        steps = [model.decode(tokens[:, :7], z, use_cache=True)]                       # prefill 7 tokens
        steps.append(model.decode(tokens[:, 7:12], z, start_pos=7, use_cache=True))   # a chunk of 5
        steps += [model.decode(tokens[:, t:t + 1], z, start_pos=t, use_cache=True) for t in range(12, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_inheritable_cross_attention_acts():
    """The released code's bug left M = 1; here M must decay and the output must change."""
    torch.manual_seed(0)
    model = trained_like(build(tiny(inheritable=True))).eval()
    tokens, images = batch(model.cfg)
    with torch.no_grad():
        z = model.visual_memory(3, images)
        read = model.memory_read(z)
        read.history = []
        on = model.llama(tokens, memory=read)
        model.inheritable = False
        off = model.decode(tokens, z)
    assert read.M is not None and (read.M < 1).any()
    assert len(read.history) == model.cfg.llama.n_layers
    k = int(0.3 * model.cfg.lsrm.n_slots)
    assert ((read.history[0] < 1).sum(-1) == k).all()                  # first block: exactly k per row
    assert not torch.allclose(on, off)


def test_m_is_fresh_for_every_forward():
    model = trained_like(build(tiny(inheritable=True))).eval()
    tokens, images = batch(model.cfg)
    with torch.no_grad():
        a, b = model(tokens, images), model(tokens, images)
    assert torch.equal(a, b)


def test_memory_read_shapes():
    cfg = tiny()
    model = build(cfg)
    tokens, images = batch(cfg, B=2, T=5)
    z = model.visual_memory(2, images)
    assert z.shape == (2, cfg.lsrm.n_slots, cfg.llama.dim)
    assert torch.equal(z[:, cfg.vit.n_patches:], torch.zeros_like(z[:, cfg.vit.n_patches:]))  # padding slots
    read = model.memory_read(z)
    assert isinstance(read, InheritableCrossAttention)
    assert read(torch.randn(2, 5, cfg.llama.dim)).shape == (2, 5, cfg.llama.dim)


def test_multilevel_fusion_is_the_mean_of_the_projectors():
    cfg = tiny()
    model = trained_like(build(cfg)).eval()
    feats = [torch.randn(2, cfg.vit.n_patches, cfg.vit.width) for _ in cfg.lsrm.taps]
    with torch.no_grad():
        z = model.memory.encode(feats)
        expected = sum(p(x) for p, x in zip(model.memory.projectors, feats)) / len(feats) * cfg.lsrm.feature_scale
    torch.testing.assert_close(z[:, :cfg.vit.n_patches], expected)


def test_ablation_ladder_configs_build_and_differ():
    tiny_cfg = get_config("tiny")
    names, steps = zip(*ladder(tiny_cfg))
    base = steps[0]
    assert base.lsrm.taps == [4] and base.lsrm.proj_hidden == 64
    assert not base.lsrm.srproj and not base.lsrm.inheritable
    assert steps[1] == apply_overrides(base, ["lsrm.taps=3,4", "lsrm.proj_hidden=32"])
    assert steps[2] == apply_overrides(base, ["lsrm.taps=3,4", "lsrm.proj_hidden=32", "lsrm.srproj=true"])
    assert steps[-1] == tiny_cfg and base.lsrm.taps == [4]        # the top row is the config itself, unchanged
    tokens, images = batch(base)
    for cfg in steps:
        model = build(cfg)
        assert len(model.memory.projectors) == len(cfg.lsrm.taps)
        assert model(tokens, images).shape == (3, 17, cfg.llama.vocab_size)


def test_mixed_batch_runs_the_vit_only_on_images():
    model = trained_like(build(tiny())).eval()
    tokens, images = batch(model.cfg)
    with torch.no_grad():
        z = model.visual_memory(3, images, torch.tensor([1.0, 0.0, 1.0]))
        alone = model.visual_memory(2, images[[0, 2]])
    assert torch.equal(z[1], torch.zeros_like(z[1]))
    torch.testing.assert_close(z[[0, 2]], alone)


def test_uint8_pictures_are_normalised_in_the_model():
    """The data hands over uint8 pictures; visual_memory normalises them with train.preprocess's mean and std:
    the very Z of the floats normalised beforehand. The bare ViT refuses uint8 (it would read 0..255 as is)."""
    from model.data import normalize
    model = trained_like(build(tiny())).eval()
    S = model.cfg.vit.image_size
    pixels = torch.randint(0, 256, (3, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flags = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        z = model.visual_memory(3, pixels, flags)
        assert torch.equal(z, model.visual_memory(3, normalize(pixels, model.cfg.train.preprocess), flags))
    with pytest.raises(TypeError, match="normalised float"):
        model.visual(pixels, [1])


def test_logits_at_answer_positions_only():
    """positions (flat indices into B·T) gives exactly those rows of the full logits, and nothing else."""
    model = trained_like(build(tiny())).eval()
    tokens, images = batch(model.cfg)
    positions = torch.tensor([5, 6, 16, 17 + 3, 2 * 17 + 16])
    with torch.no_grad():
        full = model(tokens, images)                                              # (B, T, V)
        some = model(tokens, images, positions=positions)                         # (n, V)
    assert some.shape == (5, model.cfg.llama.vocab_size) and some.dtype == torch.float32
    # the same rows, up to the matrix product's rounding (a GEMM over 5 rows may sum in another order than over 51)
    torch.testing.assert_close(some, full.reshape(-1, full.shape[-1])[positions], atol=1e-5, rtol=1e-6)


def test_memory_keys_and_values_are_cast_once_per_forward(monkeypatch):
    """With bf16 frozen weights under autocast the first block casts K and V to bf16 and every later block
    reuses that one copy (one per block, each kept for backward, was ~650 MB at 7B)."""
    model = cast_frozen(build(tiny()), torch.bfloat16)
    tokens, images = batch(model.cfg)
    seen, call = [], InheritableCrossAttention.__call__
    monkeypatch.setattr(InheritableCrossAttention, "__call__",
                        lambda self, u: (seen.append((id(self.k), self.k.dtype)), call(self, u))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, images)
    assert len(seen) == model.cfg.llama.n_layers and seen[0][1] == torch.float32       # Z + P1 from fp32 adapters
    assert {dtype for _, dtype in seen[1:]} == {torch.bfloat16} and len({k for k, _ in seen[1:]}) == 1


def test_kv_cache_holds_the_prompt_and_room_to_decode():
    """A new cache holds the prompt plus CACHE_ROOM positions: decoding within them never reallocates (the
    old doubling held twice the prompt's cache to add a few tokens)."""
    from model.llama import CACHE_ROOM
    model = build(tiny()).eval()
    tokens, _ = batch(model.cfg, B=2, T=100)
    attn = model.llama.layers[0].attention
    with torch.no_grad():
        model.llama(tokens, use_cache=True)
        buffer = attn.cache_k
        assert buffer.shape[2] == 100 + CACHE_ROOM
        for t in range(100, 100 + CACHE_ROOM):
            model.llama(tokens[:, :1], start_pos=t, use_cache=True)
        assert attn.cache_k is buffer                                             # never reallocated
        model.llama(tokens[:, :1], start_pos=100 + CACHE_ROOM, use_cache=True)
        assert attn.cache_k.shape[2] == 100 + 2 * CACHE_ROOM + 1                  # then grows by CACHE_ROOM
    model.llama.reset_cache()


def test_kv_cache_grown_past_its_room_keeps_what_it_held():
    """Decoding past CACHE_ROOM reallocates the cache and copies what it held: the logits are a full pass's."""
    from model.llama import CACHE_ROOM
    model = trained_like(build(tiny())).eval()
    tokens, images = batch(model.cfg, B=2, T=20 + CACHE_ROOM + 3)
    with torch.no_grad():
        z = model.visual_memory(2, images)
        full = model.decode(tokens, z)
        model.llama.reset_cache()
        steps = [model.decode(tokens[:, :20], z, use_cache=True)]
        steps += [model.decode(tokens[:, t:t + 1], z, start_pos=t, use_cache=True) for t in range(20, tokens.shape[1])]
        assert model.llama.layers[0].attention.cache_k.shape[2] > 20 + CACHE_ROOM           # it grew
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    model.llama.reset_cache()


def test_kv_cache_refuses_tokens_that_continue_another_batch():
    """A cache holds one batch's rows: tokens at a later position from a batch of another size (or none cached)
    are refused in one line, not mixed with the old rows (a cache of 1 row once broadcast into every row)."""
    model = build(tiny()).eval()
    tokens, _ = batch(model.cfg, B=3, T=8)
    with torch.no_grad():
        model.llama(tokens[:1], use_cache=True)                                       # a 1-row cache
        with pytest.raises(RuntimeError, match="3 rows at position 8 .* do not continue the cache") as info:
            model.llama(tokens[:, :1], start_pos=8, use_cache=True)
        assert "\n" not in str(info.value) and "reset_cache()" in str(info.value)
        model.llama(tokens, use_cache=True)                                          # a new prompt: a new cache
        assert model.llama.layers[0].attention.cache_k.shape[0] == 3
        model.llama.reset_cache()
        with pytest.raises(RuntimeError, match="which holds nothing"):
            model.llama(tokens[:, :1], start_pos=5, use_cache=True)
    model.llama.reset_cache()


def test_has_image_on_the_cpu_decides_without_the_device():
    """The trainer keeps has_image on the CPU (no device sync per micro-batch); the result is the same."""
    model = trained_like(build(tiny())).eval()
    tokens, images = batch(model.cfg)
    flags = torch.tensor([1.0, 0.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(model.visual_memory(3, images, flags),
                                   model.visual_memory(3, images, flags.clone()))
        assert torch.equal(model(tokens, images, flags), model(tokens, images, flags.to(images.device)))


def test_colour_mask_finds_the_patches_of_a_painted_shape():
    from PIL import Image, ImageDraw
    from tools.visualize import colour_mask
    img = Image.new("RGB", (64, 64), (245, 245, 240))
    ImageDraw.Draw(img).rectangle([16, 8, 31, 15], fill=(220, 40, 40))       # columns 2-3 of row 1 (8-px cells)
    mask = colour_mask(img, (220, 40, 40), 8).reshape(8, 8)
    assert mask.sum() == 2 and mask[1, 2] and mask[1, 3]
    assert not colour_mask(img, (40, 80, 220), 8).any()


def test_focus_on_named_is_M_on_the_mask_against_M_off_it():
    from tools.visualize import focus_on_named, inheritable_maps
    model = trained_like(build(tiny(inheritable=True))).eval()
    tokens, images = batch(model.cfg, B=1)
    P = model.cfg.vit.n_patches
    mask = torch.zeros(P, dtype=torch.bool)
    mask[: P // 4] = True
    M = inheritable_maps(model, tokens, images)                               # (T, P)
    f = focus_on_named(model, [(tokens, images, [(5, mask), (9, mask), (9, torch.ones(P, dtype=torch.bool))])])
    assert f["tokens"] == 2                                                   # an all-patches mask has no "rest"
    on = (M[5, mask].mean() + M[9, mask].mean()) / 2
    off = (M[5, ~mask].mean() + M[9, ~mask].mean()) / 2
    assert f["on"] == pytest.approx(float(on)) and f["off"] == pytest.approx(float(off))
    assert (M < 1).any()                                                      # M has decayed somewhere


# ---------------------------------------------------------------------------------------------
# Invariants of the whole model for any δ, λ and taps (Hypothesis)

@settings(max_examples=12, deadline=None)
@given(nothing_decays=st.sampled_from(["delta=0", "decay=1"]), delta=st.floats(0, 1), decay=st.floats(0.05, 1.0),
       seed=st.integers(0, 2 ** 16))
def test_m_that_never_decays_is_m_switched_off(nothing_decays, delta, decay, seed):
    """δ = 0 (no entry among the lowest) or λ = 1 (decayed by 1) through every block of the model: exactly the
    same logits as with M switched off (MemVP's read), whatever the other of the two."""
    cfg = tiny(delta=0.0 if nothing_decays == "delta=0" else delta, decay=1.0 if nothing_decays == "decay=1" else decay)
    torch.manual_seed(seed)
    model = trained_like(build(cfg), seed).eval()
    tokens, images = batch(cfg, B=2, T=9, seed=seed)
    with torch.no_grad():
        z = model.visual_memory(2, images)
        read = model.memory_read(z)
        on = model.llama(tokens, memory=read)
        model.inheritable = False
        off = model.decode(tokens, z)
    assert read.M is not None and torch.equal(read.M, torch.ones_like(read.M))
    assert torch.equal(on, off)


@settings(max_examples=15, deadline=None)
@given(taps=st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True), hidden=st.integers(1, 48),
       srproj=st.booleans(), frozen=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_one_lambda_per_tap_kept_in_fp32_after_the_frozen_parts_are_cast(taps, hidden, srproj, frozen):
    """SRProj: one Λ (d_h,) per tapped layer (none without srproj), trainable, kept in fp32 when the frozen
    weights are cast to bf16/fp16, and out of weight decay."""
    from model.train import make_optimizer
    cfg = apply_overrides(get_config("tiny"), [f"lsrm.taps={','.join(map(str, taps))}", f"lsrm.proj_hidden={hidden}",
                                               f"lsrm.srproj={srproj}"])
    model = cast_frozen(build(cfg), frozen)
    lambdas = {n: p for n, p in model.named_parameters() if n.endswith(".Lambda")}
    assert sorted(lambdas) == ([f"memory.projectors.{i}.Lambda" for i in range(len(taps))] if srproj else [])
    assert all(p.shape == (hidden,) and p.dtype == torch.float32 and p.requires_grad for p in lambdas.values())
    assert model.llama.norm.weight.dtype == frozen
    no_decay = make_optimizer(model, cfg).param_groups[1]
    assert no_decay["weight_decay"] == 0 and all(any(p is q for q in no_decay["params"]) for p in lambdas.values())

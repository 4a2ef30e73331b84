"""Speed and memory benchmarks (`python lsrm.py bench`): is LSRM as cheap as the paper says?

Each row times two sides, A and B, and reports B / A:

    train_step        MemVP -> LSRM         forward + backward + AdamW, adapters only trainable   target <= 1.03
    generate          MemVP -> LSRM         greedy decoding with the KV cache, time per token     target <= 1.02
    kv_cache          cached -> no cache    LSRM decoding; no cache re-runs the whole prefix      (the speed-up)
    decoder_vs_hf     transformers -> ours  LlamaForCausalLM vs our decoder, identical weights    target <= 1.00
    vit_vs_hf         transformers -> ours  CLIPVisionModel vs our ViT up to the penultimate block target <= 1.00
    lowest_selection  full sort -> topk     the lowest-δ mask of eq. 3.3.3 along the slot axis
    peak_memory       MemVP -> LSRM         memory a training step adds, each side in a fresh process

Timing: warm-up, then the two sides interleaved (A B, B A, A B, ...) in one process, so background load hits
both alike; the ratio is the median of the per-repetition ratios. Configs: `tiny`, and `mid` (D = 1024,
8 decoder layers, 16 heads, N = 320 slots, T = 256 tokens, batch 4, vocabulary 32000; a 6-block ViT of
ViT-L/14 width: 1024 wide, 16 heads, 224 px in 14 px patches -> 256 patches).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from model.config import Config, LlamaConfig, LSRMConfig, ViTConfig, get_config, memvp
from model.memory import VisualMemory, lowest_mask, n_lowest
from model.train import answer_loss_sum, make_optimizer
from model.paths import ROOT
from model.vit import VisionTransformer
from model.vlm import LSRM, build, mark_only_adapters_trainable

BATCH, PROMPT, NEW_TOKENS = 4, 16, 16                 # batch everywhere; generation: prompt and new tokens
TOKENS = {"tiny": 64, "mid": 256}                     # T of the training step and of the decoder forward
TARGETS = {"train_step": 1.03, "generate": 1.02, "decoder_vs_hf": 1.00, "vit_vs_hf": 1.00}


def mid_config() -> Config:
    vit = ViTConfig(image_size=224, patch_size=14, width=1024, layers=6, heads=16, output_dim=768)
    llama = LlamaConfig(dim=1024, n_layers=8, n_heads=16, vocab_size=32000, multiple_of=256, norm_eps=1e-5,
                        max_seq_len=512)
    return Config("mid", vit, llama, LSRMConfig(n_slots=320, taps=[vit.layers // 2, vit.layers - 2]))


def bench_config(name: str) -> Config:
    return mid_config() if name == "mid" else get_config(name)


# ---------------------------------------------------------------------------------------------
# Timing

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(fa, fb, reps: int, device: torch.device, warmup: int = 1, min_seconds: float = 0.05) -> dict:
    """Median seconds per call of fa and fb, timed interleaved; ratio = median of per-repetition tb / ta.

    Calls quicker than `min_seconds` are repeated within one sample (the count is set in the warm-up)."""
    def timed(fn, inner):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / inner

    for _ in range(warmup):
        fa(), fb()
    inner = max(1, min(100, round(min_seconds / max(min(timed(fa, 1), timed(fb, 1)), 1e-9))))
    ta, tb = [], []
    for i in range(reps):                             # alternate which side goes first
        if i % 2 == 0:
            ta.append(timed(fa, inner)), tb.append(timed(fb, inner))
        else:
            tb.append(timed(fb, inner)), ta.append(timed(fa, inner))
    a, b = statistics.median(ta), statistics.median(tb)
    return {"a": a, "b": b, "ratio": statistics.median(b / a for a, b in zip(ta, tb)), "ratio_of_medians": b / a}


def row(name: str, cfg: Config, device, a: str, b: str, r: dict, unit: str = "ms", scale: float = 1e3, **extra):
    target = TARGETS.get(name)
    return {"name": name, "config": cfg.name, "device": str(device), "a": a, "b": b, "unit": unit,
            "a_value": r["a"] * scale, "b_value": r["b"] * scale, "ratio": r["ratio"],
            "ratio_of_medians": r.get("ratio_of_medians", r["ratio"]), "target": target,
            "met": None if target is None else r["ratio"] <= target, **extra}


def skipped(name: str, cfg: Config, device, why: str) -> dict:
    return {"name": name, "config": cfg.name, "device": str(device), "skipped": why}


# ---------------------------------------------------------------------------------------------
# The models: LSRM and MemVP sharing one set of frozen backbones (only the visual memory differs)

def model_pair(cfg: Config, device) -> tuple[LSRM, LSRM]:
    torch.manual_seed(0)
    lsrm = build(cfg, device)
    with torch.device("meta"):
        base = LSRM(memvp(cfg))
    base.visual, base.llama = lsrm.visual, lsrm.llama
    with torch.device(device):
        base.memory = VisualMemory(base.cfg)
    mark_only_adapters_trainable(base)
    return base, lsrm


def make_batch(cfg: Config, T: int, device, g: torch.Generator | None = None, batch: int = BATCH):
    s = cfg.vit.image_size
    tokens = torch.randint(0, cfg.llama.vocab_size, (batch, T), generator=g).to(device)
    targets = torch.full((batch, T), -100)
    targets[:, -8:] = tokens[:, -8:].cpu()                          # an 8-token "answer"
    images = torch.randn(batch, 3, s, s, generator=g).to(device)
    return tokens, targets.to(device), images, torch.ones(batch, device=device)


def train_step_fn(model: LSRM, batch, amp=contextlib.nullcontext, answers_only: bool = False):
    """One PEFT step (forward under `amp()`, backward, AdamW) on `batch`; returns the loss. answers_only: logits
    at the answer positions only, as the trainer takes them (the speed rows keep every position's, as measured)."""
    model.train()
    opt = make_optimizer(model, model.cfg)
    tokens, targets, images, has_image = batch
    positions = (targets.reshape(-1) != -100).nonzero()[:, 0] if answers_only else None

    def step():
        with amp():
            logits = model(tokens, images, has_image, positions=positions)       # (B, T, V), or (n, V) answers only
            loss = answer_loss_sum(logits, targets if positions is None else targets.reshape(-1)[positions])
            loss = loss / 8 / tokens.shape[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


@torch.no_grad()
def generate_full_prefix(model: LSRM, tokens, z, n: int):
    """Greedy decoding without a KV cache: every new token re-runs the whole sequence."""
    for _ in range(n):
        nxt = model.decode(tokens, z, last_only=True)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
    return tokens


# ---------------------------------------------------------------------------------------------
# The rows

def bench_training_and_generation(cfg: Config, device, reps: int) -> list[dict]:
    base, lsrm = model_pair(cfg, device)
    batch = make_batch(cfg, TOKENS[cfg.name], device)
    r = compare(train_step_fn(base, batch), train_step_fn(lsrm, batch), reps, device)
    rows = [row("train_step", cfg, device, "MemVP", "LSRM", r, tokens=TOKENS[cfg.name], batch=BATCH)]

    prompt, _, images, has_image = make_batch(cfg, PROMPT, device)
    with torch.no_grad():
        z_base = base.eval().visual_memory(BATCH, images, has_image)
        z_lsrm = lsrm.eval().visual_memory(BATCH, images, has_image)
    gen = lambda m, z: lambda: m.generate(prompt, z, NEW_TOKENS, eos_id=-1)      # eos -1: never stops
    per_token = 1e3 / NEW_TOKENS
    note = f"prompt {PROMPT} + {NEW_TOKENS} new tokens, batch {BATCH}; time per token includes the prefill"
    r = compare(gen(base, z_base), gen(lsrm, z_lsrm), reps, device)
    rows.append(row("generate", cfg, device, "MemVP", "LSRM", r, unit="ms/token", scale=per_token, note=note))
    r = compare(gen(lsrm, z_lsrm), lambda: generate_full_prefix(lsrm, prompt, z_lsrm, NEW_TOKENS), reps, device)
    rows.append(row("kv_cache", cfg, device, "LSRM cached", "LSRM no cache", r, unit="ms/token",
                    scale=per_token, note=note, tokens_per_s_cached=BATCH * NEW_TOKENS / r["a"]))
    return rows


def hf_llama(llm, cfg: LlamaConfig):
    import transformers
    from model.weights import to_hf_llama_config, to_hf_llama_state_dict
    config = transformers.LlamaConfig(**to_hf_llama_config(cfg), attn_implementation="sdpa")
    with torch.device("meta"):
        ref = transformers.LlamaForCausalLM(config)
    ref.load_state_dict(to_hf_llama_state_dict(llm.state_dict(), cfg), strict=not cfg.tie_embeddings, assign=True)
    ref.tie_weights()
    with torch.device(llm.norm.weight.device):
        ref.model.rotary_emb = type(ref.model.rotary_emb)(config=config)   # a computed buffer, not a weight
    return ref.eval()


def hf_clip(vit: VisionTransformer, cfg: ViTConfig, n_blocks: int):
    """CLIPVisionModel holding our first `n_blocks` blocks: HF runs every block it has, so giving it only
    the ones ours runs (up to the penultimate) compares like with like."""
    import transformers
    config = transformers.CLIPVisionConfig(
        hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=n_blocks,
        num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        layer_norm_eps=cfg.eps, hidden_act="quick_gelu", attn_implementation="sdpa")
    ref = transformers.CLIPVisionModel(config).to(vit.conv1.weight.device)
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith("transformer.resblocks.")
          or int(k.split(".")[2]) < n_blocks}
    from model.weights import to_hf_clip_state_dict
    getattr(ref, "vision_model", ref).load_state_dict(to_hf_clip_state_dict(sd), strict=True)
    return ref.eval()


@torch.no_grad()
def bench_vs_transformers(cfg: Config, device, reps: int) -> list[dict]:
    try:
        import transformers  # noqa: F401  (only to know whether it is there)
    except ImportError:
        why = "transformers not installed"
        return [skipped("decoder_vs_hf", cfg, device, why), skipped("vit_vs_hf", cfg, device, why)]
    torch.manual_seed(0)
    with torch.device(device):
        model = LSRM(Config(cfg.name, ViTConfig(**{**cfg.vit.__dict__, "adapters": False}), cfg.llama, cfg.lsrm))
    model.eval().requires_grad_(False)
    tokens, _, images, _ = make_batch(cfg, TOKENS[cfg.name], device)

    ref = hf_llama(model.llama, cfg.llama)
    ours_fn, ref_fn = lambda: model.llama(tokens), lambda: ref(input_ids=tokens, use_cache=False).logits
    diff = (ours_fn() - ref_fn()).abs().max().item()
    r = compare(ref_fn, ours_fn, reps, device)
    rows = [row("decoder_vs_hf", cfg, device, "transformers", "ours", r, max_abs_diff=diff,
                note=f"LlamaForCausalLM (sdpa), logits for all {TOKENS[cfg.name]} positions, batch {BATCH}")]
    del ref

    tap = cfg.vit.layers - 2                                            # the penultimate block
    ref = hf_clip(model.visual, cfg.vit, tap + 1)
    ours_fn = lambda: model.visual(images, [tap])[0]
    ref_fn = lambda: ref(pixel_values=images).last_hidden_state
    diff = (ours_fn() - ref_fn()).abs().max().item()
    r = compare(ref_fn, ours_fn, reps, device)
    rows.append(row("vit_vs_hf", cfg, device, "transformers", "ours", r, max_abs_diff=diff,
                    note=f"hidden state after block {tap} of {cfg.vit.layers} (HF built with {tap + 1} blocks); "
                         f"adapters off on both sides; batch {BATCH}"))
    return rows


def bench_selection(cfg: Config, device, reps: int) -> dict:
    shape = (BATCH, TOKENS[cfg.name], cfg.lsrm.n_slots)
    a = torch.randn(shape, device=device)
    k = n_lowest(cfg.lsrm.delta, shape[-1])

    def full_sort():
        return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.argsort(-1)[..., :k], True)
    assert torch.equal(full_sort(), lowest_mask(a, k))
    r = compare(full_sort, lambda: lowest_mask(a, k), reps, device)
    return row("lowest_selection", cfg, device, "full sort", "lowest_mask", r, shape=list(shape), k=k)


# ---------------------------------------------------------------------------------------------
# Peak memory of one training step, each configuration in a fresh process

def _status(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_memory_child(config: str, variant: str, device: str, threads: int) -> None:
    """Run in a subprocess: one training step; prints {"before", "peak"} in bytes as JSON."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    cfg = bench_config(config)
    cfg = memvp(cfg) if variant == "MemVP" else cfg
    torch.manual_seed(0)
    step = train_step_fn(build(cfg, device), make_batch(cfg, TOKENS[config], device))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")       # reset the RSS high-water mark (Linux >= 4.0)
        before = _status("VmRSS")
        step()
        peak = _status("VmHWM")
    print(json.dumps({"before": before, "peak": peak}))


def bench_memory(cfg: Config, device, threads: int) -> dict:
    got = {}
    for variant in ("MemVP", "LSRM"):
        code = (f"from tools.bench import peak_memory_child; "
                f"peak_memory_child({cfg.name!r}, {variant!r}, {str(device)!r}, {threads})")
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            return skipped("peak_memory", cfg, device, f"child failed: {p.stderr.strip().splitlines()[-1:]}")
        got[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    step = {v: (m["peak"] - m["before"]) for v, m in got.items()}
    r = {"a": step["MemVP"], "b": step["LSRM"], "ratio": step["LSRM"] / max(step["MemVP"], 1)}
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "RSS high-water mark (VmHWM)"
    return row("peak_memory", cfg, device, "MemVP", "LSRM", r, unit="MiB", scale=2 ** -20,
               peak_total_mib={v: m["peak"] / 2 ** 20 for v, m in got.items()},
               note=f"memory one step adds above the built model, {how}, fresh process each")


# ---------------------------------------------------------------------------------------------
# Readiness without a GPU (`python lsrm.py step-check`)

@torch.no_grad()
def random_frozen(cfg: Config, device, dtype: torch.dtype, g: torch.Generator) -> LSRM:
    """A full-shape LSRM whose frozen weights are random and made straight in `dtype` (never a fp32 copy
    of a 7B model): N(0, 0.02), norms 1; adapters fresh in fp32."""
    from model.weights import materialize
    model = build(cfg, device="meta")
    for name, p in list(model.named_parameters()):
        if not p.requires_grad and name != "visual.proj":
            mod, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            w = torch.empty(p.shape, device=device, dtype=dtype)
            is_norm = p.ndim == 1 and name.endswith("weight") and ("norm" in name or ".ln_" in name)
            w.fill_(1.0) if is_norm else w.normal_(0.0, 0.02, generator=g)
            setattr(mod, attr, torch.nn.Parameter(w, requires_grad=False))
    return materialize(model, device=device, dtype=dtype)


def step_check(cfg: Config, device: torch.device, dtype: torch.dtype, batch: int, tokens: int) -> dict:
    """One PEFT training step at a preset's true shape with random frozen weights: time and peak memory."""
    import resource
    from model.train import autocast
    t0 = time.time()
    g = torch.Generator(device=device).manual_seed(0)
    model = random_frozen(cfg, device, dtype, g)
    _sync(device)                                  # CUDA runs ahead of the clock: wait before reading it
    built = time.time() - t0
    data = make_batch(cfg, tokens, device, torch.Generator().manual_seed(1), batch)     # drawn on the CPU
    step = train_step_fn(model, data, lambda: autocast(device, dtype), answers_only=True)
    _sync(device)
    t1 = time.time()
    loss = step()
    _sync(device)
    seconds = time.time() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20            # KiB -> GiB (Linux)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"config": cfg.name, "device": str(device), "frozen_dtype": str(dtype).removeprefix("torch."),
            "batch": batch, "tokens": tokens, "trainable": trainable, "loss": round(loss.item(), 4),
            "build_seconds": round(built, 1), "step_seconds": round(seconds, 1), "peak_memory_gib": round(peak, 2)}


# ---------------------------------------------------------------------------------------------

def machine(threads: int, devices: list) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "devices": [str(d) for d in devices], "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if any(d.type == "cuda" for d in devices):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def run_bench(configs=("tiny", "mid"), reps: int = 5, threads: int | None = None, log=print) -> dict:
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for name in configs:
            cfg = bench_config(name)
            log(f"[{device} {name}] training step and generation ...")
            rows += bench_training_and_generation(cfg, device, reps)
            gc.collect()
            log(f"[{device} {name}] against transformers ...")
            rows += bench_vs_transformers(cfg, device, reps)
            gc.collect()
            rows.append(bench_selection(cfg, device, reps))
            log(f"[{device} {name}] peak memory ...")
            rows.append(bench_memory(cfg, device, threads))
    return {"machine": machine(threads, devices), "reps": reps, "rows": rows}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'device':6} {'config':6} {'benchmark':17} {'A':>14} {'B':>14} {'A value':>11} {'B value':>11} "
             f"{'unit':9} {'B/A':>6} {'target':>7}"]
    for r in rows:
        head = f"{r['device']:6} {r['config']:6} {r['name']:17}"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']}")
            continue
        target = "" if r["target"] is None else f"<={r['target']:.2f} {'ok' if r['met'] else 'MISS'}"
        lines.append(f"{head} {r['a']:>14} {r['b']:>14} {r['a_value']:11.3f} {r['b_value']:11.3f} "
                     f"{r['unit']:9} {r['ratio']:6.3f} {target:>7}")
    return "\n".join(lines)


def report(result: dict) -> str:
    """`run_bench`'s result as `python lsrm.py bench` prints it: the machine, then one line per row."""
    m = result["machine"]
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} thread(s), "
            f"{', '.join(m['devices'])}; median of {result['reps']} interleaved repetition(s)\n" + format_rows(result["rows"]))

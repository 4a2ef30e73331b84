"""Pictures like the paper's Figures 3 and 5, drawn with Pillow alone.

Figure 3: for chosen text tokens, the inheritable matrix M over the image patches after the last block,
          as a heat overlay on the image (dark = decayed: the patches that token learned to ignore).
Figure 5: (a) each projector's Λ sorted; (b) per-patch activation maps (‖SRProj_l(x_p)‖ for every patch p)
          of the final-layer vs the intermediate-layer projector.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from model.data import normalize
from model.vlm import LSRM

# a perceptual dark-to-bright ramp (approximately matplotlib's "inferno" at five stops)
RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] (H, W) -> RGB uint8 (H, W, 3), piecewise-linear along RAMP."""
    x = np.clip(values, 0, 1) * (len(RAMP) - 1)
    i = np.minimum(x.astype(int), len(RAMP) - 2)
    f = (x - i)[..., None]
    return ((1 - f) * RAMP[i] + f * RAMP[i + 1]).astype(np.uint8)


def normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def overlay(image: Image.Image, grid_values: np.ndarray, size: int = 224, alpha: float = 0.6,
            fixed_range: tuple[float, float] | None = None) -> Image.Image:
    """A (g, g) map, upsampled to `size` with nearest patches, blended over the image."""
    base = image.convert("RGB").resize((size, size), Image.BICUBIC)
    v = grid_values if fixed_range is None else (grid_values - fixed_range[0]) / (fixed_range[1] - fixed_range[0])
    v = normalise(grid_values) if fixed_range is None else v
    heat = Image.fromarray(colormap(v)).resize((size, size), Image.NEAREST)
    return Image.blend(base, heat, alpha)


def labelled(tiles: list[tuple[str, Image.Image]], title: str) -> Image.Image:
    """Tiles side by side with a caption under each and a title on top."""
    w, h = tiles[0][1].size
    sheet = Image.new("RGB", (w * len(tiles) + 8 * (len(tiles) + 1), h + 48), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 4), title, fill="black")
    for i, (caption, tile) in enumerate(tiles):
        x = 8 + i * (w + 8)
        sheet.paste(tile, (x, 20))
        draw.text((x, h + 26), caption[:w // 5], fill="black")
    return sheet


@torch.no_grad()
def inheritable_maps(model: LSRM, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """M after the last block for every position of `tokens` (1, T) with `image` (1, 3, H, W): (T, P)."""
    model.eval()
    applied, model.inheritable = model.inheritable, True   # M is drawn even where training did not apply it
    read = model.memory_read(model.visual_memory(1, image))            # (MemVP, before shift_epoch)
    model.inheritable = applied
    model.llama(tokens, memory=read)
    return read.M[0, :, : model.cfg.vit.n_patches].float().cpu()                      # (T, P)


def colour_mask(pil_image: Image.Image, rgb: tuple[int, int, int], grid: int, share: float = 0.1,
                tolerance: float = 60.0) -> np.ndarray:
    """(grid*grid,) bool: the patches where at least `share` of the pixels are within `tolerance` of rgb."""
    a = np.asarray(pil_image.convert("RGB"), dtype=np.float64)
    near = np.linalg.norm(a - np.array(rgb, dtype=np.float64), axis=-1) < tolerance      # (H, W)
    h, w = near.shape
    cells = near[: h // grid * grid, : w // grid * grid].reshape(grid, h // grid, grid, w // grid)
    return (cells.mean(axis=(1, 3)) >= share).reshape(-1)


@torch.no_grad()
def focus_on_named(model: LSRM, items) -> dict:
    """How much of M stays on the patches of the object a text token names (the paper's Figure 3 claim).

    items: (tokens (1, T), image (1, 3, H, W), [(position, patch mask (P,) bool), ...]) per picture.
    Per named token: mean of M over the object's patches ("on") and over the other patches ("off");
    averaged over all named tokens. M = 1 everywhere would give on = off."""
    on, off = [], []
    for tokens, image, named in items:
        M = inheritable_maps(model, tokens, image)                                      # (T, P)
        for pos, mask in named:
            mask = torch.as_tensor(mask)
            if mask.any() and (~mask).any():
                on.append(float(M[pos, mask].mean()))
                off.append(float(M[pos, ~mask].mean()))
    if not on:
        return {"tokens": 0}
    m_on, m_off = float(np.mean(on)), float(np.mean(off))
    return {"tokens": len(on), "on": m_on, "off": m_off, "ratio": m_on / m_off,
            "share_higher": float(np.mean([a > b for a, b in zip(on, off)]))}


def figure3(model: LSRM, tokenizer, pil_image: Image.Image, image: torch.Tensor, text: str,
            positions: list[int]) -> Image.Image:
    """Overlays of M for the tokens at `positions` of `text` (the prompt plus the generated answer)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    M = inheritable_maps(model, torch.tensor([ids], device=image.device), image)
    g = model.cfg.vit.grid
    decay, layers = model.cfg.lsrm.decay, model.cfg.llama.n_layers
    tiles = []
    for pos in positions:
        tok = tokenizer.decode([ids[pos]]).replace("\n", "\\n") or f"#{ids[pos]}"
        context = tokenizer.decode(ids[max(1, pos - 12):pos + 1]).replace("\n", " ")
        grid = M[pos].reshape(g, g).numpy()
        tiles.append((f"{context!r} -> {tok!r}", overlay(pil_image, grid, fixed_range=(decay ** layers, 1.0))))
    return labelled(tiles, f"Figure 3: inheritable matrix M after {layers} blocks "
                           f"(bright = kept, dark = decayed towards lambda^{layers})")


@torch.no_grad()
def projector_maps(model: LSRM, image: torch.Tensor) -> list[np.ndarray]:
    """Per tapped layer, |SRProj_l(x_p)| for every patch p of `image` (1, 3, H, W): a (P,) array each."""
    model.eval()
    feats = model.memory.project(model.visual.patch_features(normalize(image, model.cfg.train.preprocess),
                                                             model.cfg.lsrm.taps))
    return [f[0].norm(dim=-1).float().cpu().numpy() for f in feats]                 # (1, P, D) -> (P,)


def projector_focus(model: LSRM, items) -> list[float] | None:
    """Figure 5b's claim as numbers: per tapped layer, |SRProj_l(x_p)| on the named objects' patches (the
    union of each picture's masks, `items` as in focus_on_named) over that on the rest, averaged over pictures."""
    ratios = []
    for _, image, named in items:
        objects = np.logical_or.reduce([np.asarray(m) for _, m in named])
        if objects.any() and not objects.all():
            ratios.append([m[objects].mean() / m[~objects].mean() for m in projector_maps(model, image)])
    return [float(r) for r in np.mean(ratios, axis=0)] if ratios else None


@torch.no_grad()
def figure5(model: LSRM, pil_image: Image.Image, image: torch.Tensor) -> Image.Image:
    """(a) Λ of each projector, sorted; (b) per-patch activation norm of each projector on the image."""
    taps = model.cfg.lsrm.taps
    maps = [(t, m.reshape(model.cfg.vit.grid, -1)) for t, m in zip(taps, projector_maps(model, image))]
    tiles = [(f"block {t + 1} projector |SRProj(x_p)|", overlay(pil_image, m)) for t, m in maps]
    bars = []
    for proj, t in zip(model.memory.projectors, taps):
        Lambda = proj.Lambda.float().cpu().numpy() if proj.Lambda is not None else np.ones(proj.fc1.out_features)
        bars.append((f"Lambda, block {t + 1}: {Lambda.min():.2f}..{Lambda.max():.2f}",
                     bar_chart(np.sort(Lambda)[::-1])))
    top = labelled(bars, "Figure 5a: learned Lambda (diagonal of the SRProj), sorted; line = 1 (init)")
    bottom = labelled(tiles, "Figure 5b: per-patch activation of each layer's projector")
    sheet = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    sheet.paste(top, (0, 0))
    sheet.paste(bottom, (0, top.height))
    return sheet


def bar_chart(values: np.ndarray, size: int = 224) -> Image.Image:
    """Bars from 0 for each value; a line at 1 (Λ's initial value)."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    top = max(float(values.max()), 1.0) * 1.1
    bottom = min(float(values.min()), 0.0)
    y = lambda v: size - 1 - (v - bottom) / (top - bottom) * (size - 1)      # noqa: E731
    w = size / len(values)
    for i, v in enumerate(values):
        draw.rectangle([i * w, min(y(v), y(0)), (i + 1) * w - 1, max(y(v), y(0))], fill=(87, 16, 110))
    draw.line([0, y(1.0), size, y(1.0)], fill=(249, 142, 9), width=1)
    return img


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def draw_figures(model: LSRM, tokenizer, path: Path, prompt: str, out: Path, device) -> tuple[str, Path, Path]:
    """Figures 3 and 5 for one image and prompt: the model answers it, and Figure 3 shows M at four positions
    (mid-question, end of the question line, the answer's first and last token). Returns the answer and both
    PNGs' paths."""
    from model.data import load_pixels
    from model.evaluate import ANSWER_PREFIX
    from model.metrics import answer_complete
    cfg = model.cfg
    image = load_pixels(path, cfg.vit.image_size, cfg.train.preprocess)[None].to(device)      # (1, 3, S, S) uint8
    steps_first = cfg.train.task == "scienceqa" and cfg.train.prompt_format != "QCM-A"
    # QCM-A: the letter after " The answer is"; QCM-EA/LEA: the model writes its solution first, then the answer
    prefix = ANSWER_PREFIX if cfg.train.task == "scienceqa" and not steps_first else ""
    budget = (cfg.train.gen_tokens or 128) if steps_first else 8
    stop = (lambda ids: answer_complete(tokenizer.decode(ids))) if steps_first else None
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt + prefix)
    answer = model.generate(torch.tensor([ids], device=device), model.visual_memory(1, image), budget,
                            tokenizer.eos_id, stop=stop)[0]
    text = prompt + prefix + tokenizer.decode(answer)
    n = len(tokenizer.encode(text)) + 1                                   # + BOS
    q_end = len(tokenizer.encode(prompt.split("\n")[0])) + 1            # end of the question line
    positions = sorted({max(1, q_end // 2), q_end, n - len(answer) - 1, n - 1})
    pil = Image.open(path)
    f3 = save(figure3(model, tokenizer, pil, image, text, positions), out / "figure3_inheritable_M.png")
    f5 = save(figure5(model, pil, image), out / "figure5_lambda_and_maps.png")
    return tokenizer.decode(answer), f3, f5


def focus_report(model: LSRM, tokenizer, examples, device, limit: int = 200) -> list[str]:
    """Figures 3 and 5b's claims as numbers, on up to `limit` test pictures of the toy world: M on the patches
    of each object the question names by one of the toy palette's colours ("the red circle": the token after
    "red") against M on the rest of the picture (focus_on_named), and each projector's activation there
    against the rest (projector_focus)."""
    from model.data import load_pixels
    from tiny_data.make_tiny_data import COLOURS as palette
    cfg, items = model.cfg, []
    for ex in [e for e in examples if e.image is not None][:limit]:
        ids = [tokenizer.bos_id] + tokenizer.encode(ex.prompt.split("\n")[0])      # the question line
        pil = Image.open(ex.image)
        named = [(p + 1, colour_mask(pil, palette[word], cfg.vit.grid)) for p in range(1, len(ids) - 1)
                 if (word := tokenizer.decode([ids[p]]).strip()) in palette]
        if named:
            image = load_pixels(ex.image, cfg.vit.image_size, cfg.train.preprocess)[None].to(device)
            items.append((torch.tensor([ids], device=device), image, named))
    f, r = focus_on_named(model, items), projector_focus(model, items)
    lines = []
    if r:
        lines.append("Figure 5b as a number: mean |SRProj(x_p)| on the named objects' patches / on the rest, per "
                     "tapped block (counted from 1): " +
                     ", ".join(f"block {t + 1} x{v:.2f}" for t, v in zip(cfg.lsrm.taps, r)))
    if f["tokens"]:
        lines.append(f"Figure 3 as a number ({f['tokens']} tokens naming an object by colour, {len(items)} test "
                     f"pictures): mean M {f['on']:.3f} on the named object's patches, {f['off']:.3f} on the rest "
                     f"(x{f['ratio']:.2f}; higher on the object for {100 * f['share_higher']:.1f}% of the tokens)")
    return lines


def visualize(model: LSRM, tokenizer, out: Path, device, image: Path | None = None, prompt: str | None = None,
              examples=None) -> list[str]:
    """`python lsrm.py visualize`: both figures for `image` and `prompt`, or for the first test picture of
    `examples` and its own question; with that default on ScienceQA-format data, also focus_report's numbers.
    Returns the lines to print."""
    if image is None:
        ex = next(e for e in examples if e.image is not None)
        image, prompt = ex.image, prompt or ex.prompt
    answer, f3, f5 = draw_figures(model, tokenizer, Path(image), prompt or "", Path(out), device)
    lines = [f"answer: {answer!r}", f"wrote {f3}", f"wrote {f5}"]
    if examples is not None and model.cfg.train.task == "scienceqa":
        lines += focus_report(model, tokenizer, examples, device)
    return lines

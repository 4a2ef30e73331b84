"""Data: ScienceQA and COCO-Karpathy readers, prompts, image preprocessing, batching.

  read_scienceqa / read_coco   files -> list[Example] (prompt, target, image path, info for metrics),
                               validated before anything trains: a bad file raises DataError, one
                               line naming the file and the problem
  load_pixels                  image file -> the (3, S, S) uint8 picture the model takes (CLIP's
                               preprocessing or the released code's); `normalize` makes it the ViT's input,
                               on the model's device, at the start of LSRM.visual_memory
  load_image, preprocess_image image file / PIL image -> the normalised (3, S, S) float32 tensor (the bare ViT's)
  VLDataset, collate           Examples -> token ids -> padded batches whose loss covers the answer only

The same readers serve the real datasets and the committed toy ones in tiny_data/ (same layouts).
"""
from __future__ import annotations

import collections
import functools
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import PROMPT_FORMATS       # QCM-A, QCM-EA, QCM-LEA
from .errors import DataError            # '<file>: <problem>', one line
from .metrics import SUBJECTS            # the three ScienceQA subjects, and their Table-1 columns


@dataclass
class Example:
    id: str
    prompt: str
    target: str
    image: Path | None
    info: dict = field(default_factory=dict)   # ScienceQA: subject, grade, has_hint, has_image, answer, choices
                                               # COCO: references (all raw captions)


def _load_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# ---------------------------------------------------------------------------------------------
# ScienceQA

SCIENCEQA_FIELDS = ("question", "choices", "answer", "hint", "image", "grade", "subject", "split")


def scienceqa_prompt(question: str, choices: list[str], context: str = "") -> str:
    """The QCM->A prompt: question, context (hint, or "N/A"), lettered options."""
    options = " ".join(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(choices))
    return f"Question: {question}\nContext: {context or 'N/A'}\nOptions: {options}\nResponse:"


def scienceqa_target(answer: int, prompt_format: str = "QCM-A", lecture: str = "", solution: str = "") -> str:
    """What the model learns to write after the prompt, as ScienceQA's create_training_example writes it:
        QCM-A    " The answer is X."
        QCM-EA   " {solution} The answer is X."
        QCM-LEA  " {lecture} {solution} The answer is X."
    lecture and solution are stripped and an empty one is left out (so no double spaces)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    # The released code joins prompt and answer with no space ("Response:The answer is A."); we keep
    # the space a reader (and a tokenizer's word boundaries) expects. QCM-A's evaluation decodes after
    # "...Response: The answer is" and reads the first capital letter.
    # ScienceQA's code writes each newline of a lecture or solution as a literal backslash-n (for GPT-3's
    # prompts); we keep the text's own newlines.
    parts = {"QCM-A": [], "QCM-EA": [solution], "QCM-LEA": [lecture, solution]}[prompt_format]
    before = "".join(f" {p.strip()}" for p in parts if p.strip())
    return f"{before} The answer is {string.ascii_uppercase[answer]}."


def read_scienceqa(root: str | Path, split: str, captions: bool = False, prompt_format: str = "QCM-A",
                   log=print) -> list[Example]:
    """problems.json + pid_splits.json (+ captions.json) -> the split's Examples, all checked first.

    prompt_format sets the targets (`scienceqa_target`). An item without the text its format puts before
    the answer (QCM-EA: no solution; QCM-LEA: neither lecture nor solution) is trained on the answer alone,
    and those items are counted in one note.

    captions=True appends each image's caption to the context. The released code does this at
    evaluation only (so the model meets captions it never trained with); here it is on for every
    split or off for every split, so set it the same for training and evaluation.
    """
    root = Path(root)
    problems_file, splits_file = root / "problems.json", root / "pid_splits.json"
    problems, splits = _load_json(problems_file), _load_json(splits_file)
    if not isinstance(problems, dict):
        raise DataError(f"{problems_file}: expected an object {{pid: problem}}, got {type(problems).__name__}")
    if not isinstance(splits, dict):
        raise DataError(f"{splits_file}: expected an object {{split: [pids]}}, got {type(splits).__name__}")
    if split not in splits:
        raise DataError(f"{splits_file}: no split {split!r}; it has: {', '.join(splits)}")
    caption_of = {}
    if captions:
        captions_file = root / "captions.json"
        caption_of = _load_json(captions_file)
        if not isinstance(caption_of, dict) or not isinstance(caption_of.get("captions"), dict):
            raise DataError(f"{captions_file}: expected {{\"captions\": {{pid: text}}}}")
        caption_of = caption_of["captions"]
        odd = next((pid for pid, text in caption_of.items() if not isinstance(text, str)), None)
        if odd is not None:
            raise DataError(f"{captions_file}: the caption of pid {odd!r} is {caption_of[odd]!r}, not text")

    if not isinstance(splits[split], list):
        raise DataError(f"{splits_file}: split {split!r} is a {type(splits[split]).__name__}, not a list of pids")
    if not splits[split]:
        raise DataError(f"{splits_file}: split {split!r} is empty")
    pid, times = collections.Counter(map(str, splits[split])).most_common(1)[0]
    if times > 1:                          # each would be trained on (and scored) that many times
        raise DataError(f"{splits_file}: split {split!r} lists pid {pid!r} {times} times")
    examples, answer_alone, uncaptioned = [], 0, 0
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise DataError(f"{splits_file}: split {split!r} lists pid {pid!r}, which has no problem in {problems_file.name}")
        p = _check_problem(problems[pid], pid, problems_file)
        image = None
        if p["image"]:
            # images live under the problem's own split (a "trainval" pid may be a val image)
            image = root / "images" / p["split"] / pid / p["image"]
            if not image.is_file():
                raise DataError(f"{image}: image of problem {pid!r} not found")
        context = p["hint"].strip()
        if captions and image is not None:
            uncaptioned += pid not in caption_of
            context = f"{context} {caption_of.get(pid, '')}".strip()
        lecture, solution = (p.get("lecture") or "").strip(), (p.get("solution") or "").strip()
        target = scienceqa_target(p["answer"], prompt_format, lecture, solution)
        answer_alone += prompt_format != "QCM-A" and target == scienceqa_target(p["answer"])
        examples.append(Example(
            id=pid, prompt=scienceqa_prompt(p["question"], p["choices"], context),
            target=target, image=image,
            info=dict(subject=p["subject"], grade=p["grade"], has_hint=bool(p["hint"].strip()),
                      has_image=image is not None, answer=p["answer"], choices=list(p["choices"]),
                      question=p["question"], hint=p["hint"].strip(), type=p.get("category") or "(none)",
                      lecture=lecture, solution=solution,
                      # the picture in words, for the oracle bound: the toy data has it, ScienceQA does not
                      description=p.get("description") if isinstance(p.get("description"), str) else None)))
    if answer_alone:
        missing = "solution" if prompt_format == "QCM-EA" else "lecture or solution"
        log(f"note: {answer_alone} of {len(examples)} items of {problems_file} (split {split!r}) have no {missing}: "
            f"their target is the answer alone")
    if uncaptioned:
        log(f"note: {uncaptioned} of {sum(e.image is not None for e in examples)} picture items of split {split!r} "
            f"have no caption in {root / 'captions.json'}: their context has none")
    return examples


def _check_problem(p, pid: str, file: Path) -> dict:
    where = f"{file}: problem {pid!r}"
    if not isinstance(p, dict):
        raise DataError(f"{where} is not an object")
    for key in SCIENCEQA_FIELDS:
        if key not in p:
            raise DataError(f"{where} is missing field {key!r}")
    choices = p["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where} has choices {choices!r}; expected a list of at least 2 strings")
    if len(choices) > 26:
        raise DataError(f"{where} has {len(choices)} choices; at most 26 can be lettered")
    answer = p["answer"]
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise DataError(f"{where} has answer {answer!r}; expected an integer index")
    if not 0 <= answer < len(choices):
        raise DataError(f"{where} has answer {answer} outside its {len(choices)} choices")
    if not isinstance(p["question"], str) or not isinstance(p["hint"], str):
        raise DataError(f"{where} has a question or hint that is not a string")
    if p["subject"] not in SUBJECTS:
        raise DataError(f"{where} has subject {p['subject']!r}; expected one of: {', '.join(SUBJECTS)}")
    grade = p["grade"]
    if not (isinstance(grade, str) and grade.startswith("grade") and grade[5:].isdigit() and 1 <= int(grade[5:]) <= 12):
        raise DataError(f"{where} has grade {grade!r}; expected 'grade1'..'grade12'")
    if p["image"] is not None and not isinstance(p["image"], str):
        raise DataError(f"{where} has image {p['image']!r}; expected a file name or null")
    for key in ("lecture", "solution"):                 # optional: absent or null is no text
        if p.get(key) is not None and not isinstance(p[key], str):
            raise DataError(f"{where} has {key} {p[key]!r}; expected a string or null")
    return p


# ---------------------------------------------------------------------------------------------
# COCO Captions, Karpathy split

CAPTION_PROMPT = "Instruction: Summarize the visual content of the image.\nResponse:"
COCO_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def read_coco(root: str | Path, split: str, log=print) -> list[Example]:
    """dataset_coco.json -> Examples. train (with restval): one per (image, caption);
    val/test: one per image, target = first caption, every caption in info["references"].
    Empty captions (only spaces) are left out, counted in one note."""
    root = Path(root)
    file = root / "dataset_coco.json"
    if split not in COCO_SPLITS:
        raise DataError(f"{file}: no split {split!r}; choose one of: {', '.join(COCO_SPLITS)}")
    data = _load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{file}: expected an object with an \"images\" list")
    examples, blank = [], 0
    known = {name for names in COCO_SPLITS.values() for name in names}
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            raise DataError(f"{file}: images[{i}] is not an object")
        for key in ("filepath", "filename", "split", "sentences"):
            if key not in entry:
                raise DataError(f"{file}: images[{i}] is missing field {key!r}")
        if entry["split"] not in known:        # a misspelt split would silently shrink (or empty) another
            raise DataError(f"{file}: images[{i}] has split {entry['split']!r}; Karpathy's splits are "
                            f"{', '.join(sorted(known))}")
        if entry["split"] not in COCO_SPLITS[split]:
            continue
        image_id = str(entry.get("cocoid", entry.get("imgid", i)))
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise DataError(f"{file}: image {image_id} has no sentences")
        if not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise DataError(f"{file}: image {image_id} has a sentence without a 'raw' caption")
        if not isinstance(entry["filepath"], str) or not isinstance(entry["filename"], str):
            raise DataError(f"{file}: image {image_id} has filepath {entry['filepath']!r} and filename "
                            f"{entry['filename']!r}; expected text")
        image = root / entry["filepath"] / entry["filename"]
        if not image.is_file():
            raise DataError(f"{image}: image {image_id} not found")
        refs = [s["raw"].strip() for s in sentences]
        blank += refs.count("")
        refs = [r for r in refs if r]          # an empty target teaches the end of text, an empty reference scores 0
        if not refs:
            raise DataError(f"{file}: image {image_id} has only empty captions")
        if split == "train":
            examples += [Example(f"{image_id}-{k}", CAPTION_PROMPT, " " + r, image, dict(references=refs))
                         for k, r in enumerate(refs)]
        else:
            examples.append(Example(image_id, CAPTION_PROMPT, " " + refs[0], image, dict(references=refs)))
    if not examples:                       # a misspelt split in the file, most likely
        found = sorted({str(e.get("split")) for e in data["images"] if isinstance(e, dict)})
        raise DataError(f"{file}: no image has split {' or '.join(COCO_SPLITS[split])}; the splits found: "
                        f"{', '.join(found) or 'none'}")
    if blank:
        log(f"note: {blank} captions of the {split} images in {file} are empty (only spaces): left out")
    return examples


# ---------------------------------------------------------------------------------------------
# Images

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _open(path: Path) -> Image.Image:
    if path.is_dir():
        raise DataError(f"{path}: a directory, not an image file")
    try:
        with Image.open(path) as img:
            img.load()                 # decode now: a truncated file fails here, not in a worker later
            return _8bit(img, path).convert("RGB")  # as CLIP does (grey, palette and RGBA files alike)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: not a readable image ({reason})") from None


def _8bit(img: Image.Image, path: Path) -> Image.Image:
    """16-bit grey (a PNG's mode I;16) scaled to 8 bits (x 255/65535): Pillow's convert("RGB") clips it at
    255 instead, an all-white picture. 32-bit integer and float pixels are refused. (16-bit colour PNGs
    Pillow already reads as 8-bit RGB.)"""
    if img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64)                                     # (H, W) in 0..65535
        return Image.fromarray(np.round(a * (255 / 65535)).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        raise DataError(f"{path}: {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels (mode "
                        f"{img.mode}) are not read: save it with 8 or 16 bits per channel")
    return img


def load_pixels(path: str | Path, image_size: int, preprocess: str = "clip") -> torch.Tensor:
    """Image file -> the (3, S, S) uint8 picture, resized and cropped, not normalised; DataError if missing or
    unreadable."""
    return channels_first(image_pixels(_open(Path(path)), image_size, preprocess))


def load_image(path: str | Path, image_size: int, preprocess: str = "clip") -> torch.Tensor:
    """Image file -> normalised (3, S, S) float32 tensor; DataError if missing or unreadable."""
    return preprocess_image(_open(Path(path)), image_size, preprocess)


def preprocess_image(img: Image.Image, image_size: int, preprocess: str = "clip") -> torch.Tensor:
    """PIL image -> normalised (3, S, S) float tensor.

    "clip":   stock CLIP: short side to S (bicubic), center crop S x S, CLIP's mean/std (the default).
    "squash": the released code: S x S (bicubic, aspect ratio not kept), ImageNet mean/std.
    """
    return normalize(channels_first(image_pixels(img, image_size, preprocess)), preprocess)


def image_pixels(img: Image.Image, image_size: int, preprocess: str = "clip") -> np.ndarray:
    """PIL image -> the (S, S, 3) uint8 picture the model sees, resized and cropped, before normalising."""
    img, S = img.convert("RGB"), image_size
    if preprocess == "clip":
        w, h = img.size
        short, long = min(w, h), max(w, h)
        size = (S, int(S * long / short)) if w <= h else (int(S * long / short), S)   # as torchvision.Resize(S)
        img = img.resize(size, Image.BICUBIC)
        left, top = int(round((size[0] - S) / 2.0)), int(round((size[1] - S) / 2.0))  # as CenterCrop(S)
        img = img.crop((left, top, left + S, top + S))
    elif preprocess == "squash":
        img = img.resize((S, S), Image.BICUBIC)
    else:
        raise ValueError(f"preprocess must be 'clip' or 'squash', got {preprocess!r}")
    return np.asarray(img)


def channels_first(pixels: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 array -> a (3, S, S) uint8 tensor of its own (a copy: PIL's arrays are read-only)."""
    return torch.from_numpy(np.array(pixels.transpose(2, 0, 1), order="C"))


def normalize(images: torch.Tensor, preprocess: str = "clip") -> torch.Tensor:
    """uint8 pictures (..., 3, S, S), on any device -> float32 / 255, less the mean, over the std (CLIP's, or
    ImageNet's for "squash"), on that device. A float tensor is taken as normalised already: returned as it is."""
    if images.is_floating_point():
        return images
    if images.dtype != torch.uint8:
        raise TypeError(f"pictures must be uint8 (or normalised floats), got {images.dtype}")
    mean, std = _mean_std(preprocess, images.device)
    return (images.float() / 255.0 - mean) / std                           # in float32 even under autocast


@functools.lru_cache(maxsize=None)
def _mean_std(preprocess: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) float32 mean and std on `device`, made once (a copy to a GPU at every batch would wait for it)."""
    mean, std = (CLIP_MEAN, CLIP_STD) if preprocess == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    return torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1)


def check_images(examples: list[Example], decode_up_to: int = 10_000) -> bool:
    """Decode every image once (DataError on the first bad one), so training never starts on bad data, when
    there are at most `decode_up_to` of them (seconds). More (COCO's 113k: minutes in every process, past
    NCCL's 10-minute timeout for the others) are only checked to exist (the readers did): a bad one is then a
    one-line DataError naming it when training reads it. Returns whether every image was decoded."""
    paths = list(dict.fromkeys(e.image for e in examples if e.image is not None))
    if len(paths) > decode_up_to:
        return False
    for path in paths:
        _open(path)
    return True


# ---------------------------------------------------------------------------------------------
# Tokens and batches (loss on the answer tokens only, batch trimmed)

class VLDataset(torch.utils.data.Dataset):
    """Examples -> dict(tokens, n_prompt, image, has_image); image is the (3, S, S) uint8 picture (zeros without
    one), normalised by the model on its device: a DataLoader worker hands over a quarter of float32's bytes.
    Decoded pictures are kept up to `cache_mb` per process (a DataLoader worker has its own), then no more are
    added: with a random order, a cache that cannot hold the set saves only its share of decodes, and it never
    grows past its bound."""

    def __init__(self, examples: list[Example], tokenizer, image_size: int, preprocess: str = "clip",
                 max_len: int = 512, cache_mb: int = 0):
        self.examples, self.tok = examples, tokenizer
        self.image_size, self.preprocess, self.max_len = image_size, preprocess, max_len
        self.cache: dict[Path, torch.Tensor] = {}                # path -> (3, S, S) uint8
        self.cache_room = cache_mb << 20                      # bytes still free in the cache
        self._lengths: list[int] | None = None                # token_lengths(), once

    def __len__(self):
        return len(self.examples)

    def like(self, examples: list[Example]) -> "VLDataset":
        """Other examples, made into tokens and pictures the same way (no cache): the bounds' prompts."""
        return VLDataset(examples, self.tok, self.image_size, self.preprocess, self.max_len)

    def collate(self, items: list[dict]) -> dict:
        """A batch of this dataset's items: `collate` with its tokenizer's padding."""
        return collate(items, self.tok.pad_id)

    def image(self, path: Path | None) -> torch.Tensor:
        """(3, S, S) uint8; a cached picture is returned itself (collate copies it into the batch)."""
        if path is None:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        pixels = self.cache.get(path)
        if pixels is None:
            pixels = load_pixels(path, self.image_size, self.preprocess)
            if pixels.nbytes <= self.cache_room:
                self.cache[path], self.cache_room = pixels, self.cache_room - pixels.nbytes
        return pixels

    def check_lengths(self, source: Path, log=print) -> None:
        """Up front, before any work: every answer must fit in max_len (an error naming the item); items
        whose prompt will lose its start to fit are counted in one note."""
        cut, longest, lengths = 0, (0, ""), []
        for ex in self.examples:
            full = self._full_length(ex, source)
            lengths.append(min(full, self.max_len))
            cut += full > self.max_len
            longest = max(longest, (full, ex.id))
        self._lengths = lengths
        if cut:
            log(f"note: {cut} of {len(self.examples)} items of {source} are longer than train.max_len={self.max_len} "
                f"tokens (longest: item {longest[1]}, {longest[0]} tokens); the start of their prompts is dropped")

    def token_lengths(self) -> list[int]:
        """Each item's tokens as __getitem__ gives them (BOS, the prompt as cut, the target, EOS), without
        decoding a picture: the trainer orders a step's items into micro-batches by them."""
        if self._lengths is None:
            self._lengths = [min(self._full_length(ex), self.max_len) for ex in self.examples]
        return self._lengths

    def _full_length(self, ex: Example, source: Path | str = "") -> int:
        """BOS + the whole prompt + the target + EOS, before any cut; an answer too long to fit is an error."""
        target = len(self.tok.encode(ex.target)) + 1
        self.prompt_room(ex, target, source)
        return 1 + len(self.tok.encode(ex.prompt)) + target

    def prompt_room(self, ex: Example, target: int, source: Path | str = "") -> int:
        """Tokens left for the prompt after BOS and a `target` of so many tokens (with its EOS); none: an error."""
        room = self.max_len - 1 - target
        if room < 0:
            raise DataError(f"{source or 'data'}: item {ex.id}: its answer alone is {target} tokens, more than "
                            f"train.max_len={self.max_len} holds")
        return room

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        prompt, target = self.tok.encode(ex.prompt), self.tok.encode(ex.target) + [self.tok.eos_id]
        room = self.prompt_room(ex, len(target))
        prompt = prompt[len(prompt) - room:] if len(prompt) > room else prompt   # drop the prompt's start
        return dict(tokens=[self.tok.bos_id] + prompt + target, n_prompt=1 + len(prompt),
                    image=self.image(ex.image), has_image=float(ex.image is not None))


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-pad to a batch. targets[b, t] = tokens[b, t+1] where t+1 is an answer or EOS position,
    else -100 (ignored by cross_entropy); T is cut after the last supervised position."""
    B, T = len(items), max(len(it["tokens"]) for it in items) - 1   # the final EOS is a target, never an input
    tokens = torch.full((B, T + 1), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, it in enumerate(items):
        seq = torch.tensor(it["tokens"], dtype=torch.long)
        tokens[b, :len(seq)] = seq
        targets[b, it["n_prompt"] - 1:len(seq) - 1] = seq[it["n_prompt"]:]   # predict answer + EOS
    return dict(tokens=tokens[:, :T], targets=targets,                       # (B, T), (B, T)
                images=torch.stack([it["image"] for it in items]),           # (B, 3, S, S) uint8
                has_image=torch.tensor([it["has_image"] for it in items]))   # (B,)

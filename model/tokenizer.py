"""Tokenizers. The tiny presets use bytes plus a word list; real checkpoints use their own (wrappers below).

Every tokenizer offers: encode(text, bos=False, eos=False) -> list[int], decode(ids) -> str,
and the attributes vocab_size, bos_id, eos_id, pad_id.
"""
from __future__ import annotations

from .errors import DataError, MissingPackage


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258 (259 spare: vocab 260, a multiple of 4)."""
    vocab_size = 260
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class WordTokenizer(ByteTokenizer):
    """Bytes plus whole words, for the tiny presets: ids 0-255 are UTF-8 bytes, 256-258 BOS/EOS/PAD as in
    ByteTokenizer, then one id per entry of a word list (tiny_data/words.txt, one JSON string per line).

    Text is split into pieces the way GPT-2/LLaMA-3 pre-tokenize (a word with its leading space, one digit,
    one punctuation mark, one whitespace character); a piece in the list is one token, any other piece its
    bytes. So every text encodes and decode(encode(t)) == t. Why not bytes alone: a question is ~3.3x more
    tokens as bytes, and the tiny decoder then learns too slowly to answer anything in the time the CPU path
    allows (measured on the same fixed-order data, similar pretraining time: docs/results.md, "What we tried").
    """
    PATTERN = r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s"

    def __init__(self, path):
        import json
        import re
        from pathlib import Path
        words = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            try:
                w = json.loads(line)
            except json.JSONDecodeError:
                w = None
            if not isinstance(w, str) or not w:
                raise DataError(f"{path}: line {n} is not a JSON string")
            words.append(w.encode("utf-8"))
        self.ids = {w: 259 + i for i, w in enumerate(words)}
        if len(self.ids) != len(words):
            raise DataError(f"{path}: the word list repeats a word")
        self.pieces = [bytes([i]) for i in range(256)] + [b""] * 3 + words     # id -> bytes
        self.vocab_size = len(self.pieces)
        self._split = re.compile(self.PATTERN).findall

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for piece in self._split(text):
            b = piece.encode("utf-8")
            if b in self.ids:
                ids.append(self.ids[b])
            else:
                ids.extend(b)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return b"".join(self.pieces[int(i)] for i in ids if int(i) < len(self.pieces)).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Real tokenizers, each behind an optional package. `decode` drops special tokens; `encode` reads the
# special tokens' text (e.g. "<|im_start|>") as those tokens, so chat templates can be written as text.

def need(module: str, what: str = "this tokenizer"):
    """Import an optional package, or say in one line which one to install."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{what} needs the `{module}` package: pip install {module.split('.')[0]}") from None


class SentencePieceTokenizer:
    """LLaMA-1/2 and Vicuna: a SentencePiece `tokenizer.model` (BOS 1, EOS 2, no pad: pad with EOS)."""

    def __init__(self, path):
        self.sp = need("sentencepiece").SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id   # padding is never attended/scored

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + self.sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer:
    """LLaMA-3.x: the tiktoken-format `tokenizer.model` (one "base64-token rank" per line) plus Meta's
    256 special tokens numbered after the base vocabulary (<|begin_of_text|> = 128000 for the real file)."""

    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
               "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]

    def __init__(self, path):
        import base64
        tiktoken = need("tiktoken")
        with open(path, "rb") as f:
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
        self.n_base = len(ranks)
        names = self.SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(self.SPECIAL))]
        self.special = {name: self.n_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(name=str(path), pat_str=self.PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special)
        self.vocab_size = self.n_base + len(names)
        self.bos_id, self.eos_id = self.special["<|begin_of_text|>"], self.special["<|end_of_text|>"]
        self.pad_id = self.special["<|finetune_right_pad_id|>"]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.model.encode(text, allowed_special="all")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.model.decode([int(i) for i in ids if i < self.n_base])


class HFTokenizer:
    """A `tokenizers.Tokenizer`: from a Hugging Face `tokenizer.json`, or built from a GGUF vocabulary."""

    def __init__(self, tok, bos_id, eos_id, pad_id=None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids      # BOS/EOS only when asked for
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @classmethod
    def from_file(cls, path) -> "HFTokenizer":
        """tokenizer.json; the BOS/EOS/PAD strings come from tokenizer_config.json beside it, if any."""
        import json
        from pathlib import Path
        tok = need("tokenizers").Tokenizer.from_file(str(path))
        conf_file = Path(path).with_name("tokenizer_config.json")
        conf = json.loads(conf_file.read_text()) if conf_file.exists() else {}

        def token_id(name):
            t = conf.get(name)
            t = t.get("content") if isinstance(t, dict) else t
            return tok.token_to_id(t) if t else None
        return cls(tok, token_id("bos_token"), token_id("eos_token"), token_id("pad_token"))

    # llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> how text is split before byte-level BPE
    GGUF_PRE = {"gpt2": "gpt2", "default": "gpt2", "smollm": "digits+gpt2", "starcoder": "digits+gpt2",
                "refact": "digits+gpt2", "llama-bpe": "llama3", "llama3": "llama3"}
    GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4                            # tokenizer.ggml.token_type values

    @classmethod
    def from_gguf(cls, path) -> "HFTokenizer":
        """The byte-level BPE (`tokenizer.ggml.model` "gpt2") stored in a GGUF file, special tokens included."""
        gguf, tk = need("gguf"), need("tokenizers")
        fields = gguf.GGUFReader(str(path)).fields

        def meta(key, default=None):
            return fields[key].contents() if key in fields else default
        if meta("tokenizer.ggml.model") != "gpt2":
            raise DataError(f"{path}: tokenizer.ggml.model is {meta('tokenizer.ggml.model')!r}; only 'gpt2' "
                             f"(byte-level BPE) is supported")
        pre = cls.GGUF_PRE.get(meta("tokenizer.ggml.pre", "default"))
        if pre is None:
            raise DataError(f"{path}: unknown tokenizer.ggml.pre {meta('tokenizer.ggml.pre')!r}; "
                             f"known: {', '.join(cls.GGUF_PRE)}")
        tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]   # byte-level tokens hold no space
        tok = tk.Tokenizer(tk.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama3")
        if pre == "digits+gpt2":
            digits = tk.pre_tokenizers.Digits(individual_digits=True)
            tok.pre_tokenizer = tk.pre_tokenizers.Sequence([digits, byte_level])
        elif pre == "llama3":
            split = tk.pre_tokenizers.Split(tk.Regex(TiktokenTokenizer.PATTERN), behavior="isolated")
            tok.pre_tokenizer = tk.pre_tokenizers.Sequence([split, byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = tk.decoders.ByteLevel()
        tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == cls.GGUF_CONTROL])
        tok.add_tokens([tk.AddedToken(t, normalized=False)
                        for t, k in zip(tokens, types) if k == cls.GGUF_USER_DEFINED])
        return cls(tok, meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id"),
                   meta("tokenizer.ggml.padding_token_id"))


def load_tokenizer(path):
    """Pick the wrapper by file: *.gguf, tokenizer.json, or tokenizer.model (tiktoken text vs SentencePiece
    protobuf, told apart by the first line). A directory is searched for tokenizer.json, then tokenizer.model."""
    import re
    from pathlib import Path
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("tokenizer.json", "tokenizer.model") if (p / n).exists()]
        if not found:
            raise DataError(f"{p}: no tokenizer.json or tokenizer.model")
        p = found[0]
    if not p.is_file():
        raise DataError(f"{p}: no such tokenizer file")
    if p.suffix == ".txt":
        return WordTokenizer(p)
    if p.suffix == ".gguf":
        return HFTokenizer.from_gguf(p)
    if p.suffix == ".json":
        return HFTokenizer.from_file(p)
    with open(p, "rb") as f:
        first = f.readline()
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\s*", first):
        return TiktokenTokenizer(p)
    return SentencePieceTokenizer(p)

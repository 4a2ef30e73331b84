"""Tokenizers. The tiny presets use bytes; real checkpoints use their own (wrappers below).

Every tokenizer offers: encode(text, bos=False, eos=False) -> list[int], decode(ids) -> str,
and the attributes vocab_size, bos_id, eos_id, pad_id.
"""
from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258 (259 spare: vocab 260, a multiple of 4)."""
    vocab_size = 260
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

"""The tiny decoder's text: its pretraining recipe, the packing of toy documents into rows, the weighted loss.
Shared by pretrain.py (the direct decoder) and stepwise.py (the step-wise one), below both."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# rows of 224 tokens hold a picture-in-words question whole (at 128 most were dropped); ~24 min (README)
LM_RECIPE = dict(seed=4321, docs=100000, steps=3200, batch=24, seq_len=224, lr=3e-3, weight_decay=0.1,
                 answer_weight=10.0)


ANSWER_MARK = "Response: The answer is"


def answer_index(tok, doc: str, ids: list[int]) -> int | None:
    """Index in `ids` (doc encoded with BOS) of the answer letter of a question document, else None."""
    at = doc.find(ANSWER_MARK)
    if at < 0:
        return None
    k = len(tok.encode(doc[:at + len(ANSWER_MARK)], bos=True))
    while k < len(ids) and not tok.decode([ids[k]]).strip():       # bytes: the space before the letter
        k += 1
    return k if k < len(ids) else None


def pack_documents(docs: list[str], tok, seq_len: int, answer_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-aligned rows: whole documents (BOS ... EOS) packed greedily into rows of seq_len + 1
    tokens, never split across rows, the rest padded. Returns tokens (R, L + 1) and per-target loss
    weights (R, L): 0 on padding, `answer_weight` on the answer letter of a question document, else 1.
    Documents longer than a row are dropped."""
    rows, weights, row, w = [], [], [], []

    def flush():
        if row:
            pad = seq_len + 1 - len(row)
            rows.append(row + [tok.pad_id] * pad)
            weights.append(w[1:] + [0.0] * pad)          # weight of predicting token i from its prefix
            row.clear(), w.clear()

    for d in docs:
        ids = tok.encode(d, bos=True, eos=True)
        if len(ids) > seq_len + 1:
            continue
        dw = [1.0] * len(ids)
        k = answer_index(tok, d, ids)
        if k is not None:
            dw[k] = answer_weight
        if len(row) + len(ids) > seq_len + 1:
            flush()
        row += ids
        w += dw
    flush()
    return torch.tensor(rows), torch.tensor(weights)


def weighted_next_token_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets and weights (B, T) -> the weighted mean cross-entropy, in float32."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * weights.flatten()).sum() / weights.sum()

"""lsrm: a small, exact reference implementation of LSRM (arXiv 2511.08238).

config.py  presets and config dataclasses      vit.py     CLIP-shaped ViT with adapters
llama.py   LLaMA-family decoder, KV cache      memory.py  visual memory, SRProj, fusion, inheritable CA
vlm.py     ViT -> memory -> LLaMA, freezing   weights.py  real checkpoints (CLIP, Meta/HF LLaMA, GGUF)
train.py   recipe, DDP, checkpoints            pretrain.py the tiny backbones
data.py    ScienceQA / COCO readers, batching  metrics.py  ScienceQA table, BLEU-4, CIDEr-D
evaluate.py greedy decoding, evaluation        visualize.py Figures 3 and 5
tokenizer.py bytes, bytes + words (tiny), real tokenizers
"""
from .config import Config, LlamaConfig, LSRMConfig, ViTConfig, get_config, memvp, PRESETS  # noqa: F401
from .vlm import LSRM, build  # noqa: F401

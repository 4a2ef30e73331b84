"""lsrm: a small, exact reference implementation of LSRM (arXiv 2511.08238). The model, and only the model.

Read in this order: memory.py (the method: SRProj, fusion, inheritable cross-attention), then vlm.py,
llama.py and vit.py (the model around it), then train.py (the recipe). The rest is plumbing:

config.py     presets and config dataclasses       weights.py    real checkpoints (CLIP, Meta/HF LLaMA, GGUF)
data.py       ScienceQA / COCO readers, batching   tokenizer.py  bytes, bytes + words (tiny), real tokenizers
evaluate.py   evaluation, bounds                   metrics.py    ScienceQA table, BLEU-4, CIDEr-D
assemble.py   a model, its tokenizer and data      pipeline.py   one run: data, model, train, evaluate
checkpoint.py a run's checkpoint: written, read    rundir.py     a run's directory, checked up front
errors.py     the project's error types            paths.py      the repository's root, a config's paths

Tools that use the model live beside it (tools/: benchmark, figures; tiny_data/: the toy world, the tiny
backbones' pretraining, the ViT probe); nothing here imports them but one hook, assemble.tiny_backbones.
"""
from .config import Config, LlamaConfig, LSRMConfig, ViTConfig, get_config, memvp, PRESETS  # noqa: F401
from .vlm import LSRM, build  # noqa: F401

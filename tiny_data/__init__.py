"""The toy world behind the committed datasets (tiny_data/README.md), and what is built from it.

make_tiny_data.py  the generator: `python tiny_data/make_tiny_data.py` rewrites scienceqa/ and coco/
pretrain.py        the tiny backbones (backbones/vit.pt, lm.pt), pretrained on this world
probe.py           the paper's §3.1 premise measured on the tiny ViT (`python lsrm.py probe`)

    from tiny_data import draw_scene, text_corpus
    image, objects = draw_scene(random.Random(0))   # 64x64 picture + [dict(colour, shape, x, y, size)]
    docs = text_corpus(seed=1, n=10_000)            # toy documents in the fine-tuning prompt format
"""
from .make_tiny_data import draw_scene, text_corpus  # noqa: F401

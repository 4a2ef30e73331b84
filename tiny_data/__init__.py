"""The toy world behind the committed datasets (README.md). For pretraining the tiny backbones:

    from tiny_data import draw_scene, text_corpus
    image, objects = draw_scene(random.Random(0))   # 64x64 picture + [dict(colour, shape, x, y, size)]
    docs = text_corpus(seed=1, n=10_000)            # toy documents in the fine-tuning prompt format
"""
from .make_tiny_data import draw_scene, text_corpus  # noqa: F401

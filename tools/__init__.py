"""Tools beside the model: they use it, it never imports them.

ablate.py     the paper's Table 5 over seeds and the δ/λ sweep (`python lsrm.py ablate`)
bench.py      speed and memory (`python lsrm.py bench`), and one full-shape PEFT step (`step-check`)
visualize.py  the paper's Figures 3 and 5 with Pillow, and their claims as numbers (`visualize`)
"""

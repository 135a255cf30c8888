"""Evaluation of frozen backbones: weighted k-NN (``knn``), linear probes (``linear``), checkpoint loading that
fails loudly (``loading``), the ``evaluate.py`` driver (``run``) and the Fashion-MNIST comparison tables (``compare``).

Modules are imported explicitly (``from swin_ssl.evaluators import knn``); nothing heavy is imported here.
"""

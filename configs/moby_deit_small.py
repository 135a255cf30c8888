r"""MoBY with a DeiT-S backbone (Transformer-SSL ``configs/moby_deit_small.yaml``; timm ``deit_small_patch16_224``,
CLS-token features, 384-d).

Presets (``--config configs/moby_deit_small.py:<preset>``):
  paper300  300 epochs, batch 512, ImageNet-1K, same optimisation as Swin-T (reported linear top-1 72.8). Default.
  paper100  100 epochs.
  demo      ``vit_test`` on Fashion-MNIST at 32 px on the CPU, the Swin demo schedule (not run or tuned; a sanity
            check of the ViT path at demo scale).
  smoke     ``vit_test`` on synthetic data, a handful of steps (tests).
"""
from swin_ssl.config_files import config_module  # sibling config files, from any working directory

common = config_module("common")

_swin = config_module("moby_swin_tiny")


def _paper300(c):
    pass


def _paper100(c):
    c.total_epochs = 100.0


def _demo(c):
    _swin.PRESETS["demo"](c)
    c.model.name = "vit_test"


def _smoke(c):
    _swin.PRESETS["smoke"](c)
    c.model.name = "vit_test"


PRESETS = {"paper300": _paper300, "paper100": _paper100, "demo": _demo, "smoke": _smoke}


def get_config(arg: str | None = None):
    c = common.moby_config("deit_small", epochs=300, batch_size=512)
    return common.apply_preset(c, arg, PRESETS)

r"""EsViT (view + region matching) with a Swin-S backbone (microsoft/esvit README recipe).

Presets (``--config configs/esvit_swin_small.py:<preset>``): as ``esvit_swin_tiny.py`` (which documents the schema
and holds the shared builder) with Swin-S and student drop path 0.2:
  paper300      W7, 300 epochs, batch 512 -- reported 79.5 linear / 77.7 k-NN. Default.
  paper300_w14  W14 -- 80.8 / 79.1.
  view300       view term only -- 79.2 / 76.9.
  smoke         tiny CPU run (``swin_test``) for CI.

The released W14 models were trained view-only for 200 epochs and then continued with the region term
(README ``continued_from0200_dense``); ``paper300_w14`` trains view + region from scratch.
"""
from swin_ssl.config_files import config_module  # sibling config files, from any working directory

common = config_module("common")
esvit_swin_tiny = config_module("esvit_swin_tiny")


PRESETS = {k: esvit_swin_tiny.PRESETS[k] for k in ("paper300", "paper300_w14", "view300", "smoke")}


def get_config(arg: str | None = None):
    c = esvit_swin_tiny.esvit_config("swin_small", drop_path=0.2)
    return common.apply_preset(c, arg, PRESETS)

r"""EsViT (view + region matching) with a Swin-B backbone (microsoft/esvit README recipe).

Presets (``--config configs/esvit_swin_base.py:<preset>``): as ``esvit_swin_tiny.py`` (which documents the schema
and holds the shared builder) with Swin-B and student drop path 0.2:
  paper300      W7, 300 epochs, batch 512 -- reported 80.4 linear / 78.9 k-NN. Default.
  paper300_w14  W14 -- 81.3 / 79.3.
  view300       view term only -- 79.6 / 77.7.
  smoke         tiny CPU run (``swin_test``) for CI.

Swin-B W7 and all W14 models were trained view-only for 200 epochs and then continued with the region
term (README ``continued_from0200_dense``); these presets train view + region from scratch (Swin-T/S W7 style).
"""
from swin_ssl.config_files import config_module  # sibling config files, from any working directory

common = config_module("common")
esvit_swin_tiny = config_module("esvit_swin_tiny")


PRESETS = {k: esvit_swin_tiny.PRESETS[k] for k in ("paper300", "paper300_w14", "view300", "smoke")}


def get_config(arg: str | None = None):
    c = esvit_swin_tiny.esvit_config("swin_base", drop_path=0.2)
    return common.apply_preset(c, arg, PRESETS)

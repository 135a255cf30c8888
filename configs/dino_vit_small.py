r"""DINO with a ViT-S/16 backbone (facebookresearch/dino README recipes); the view term of EsViT only.

Presets (``--config configs/dino_vit_small.py:<preset>``):
  vanilla100  the README 8-GPU command with ``main_dino.py`` defaults: 100 epochs, batch 512 (64/GPU), 2 x 224
              (0.4-1) + 8 x 96 (0.05-0.4) crops, head 2048-2048-256 -> 65536 with ``norm_last_layer=True``,
              teacher temperature 0.04 (no warm-up), student 0.1, center 0.9, teacher EMA 0.996 -> 1, AdamW
              lr 5e-4 x batch/256 (10 warm-up epochs, cosine to 1e-6), weight decay 0.04 -> 0.4, per-parameter
              clipping 3.0, last layer frozen for epoch 0, drop path 0.1 / 0.0. Reported 74.0 linear / 69.3 k-NN.
              Default.
  boosted300  the README 16-GPU command: 300 epochs, batch 1024, teacher temperature 0.04 -> 0.07 over 30 epochs,
              ``norm_last_layer=False``. Reported 76.0 / 73.3.
  demo        ``vit_test`` on Fashion-MNIST, 2 x 32 + 4 x 16 px crops, CPU.
  smoke       ``vit_test`` on synthetic data, a few steps (CI).
The schema is documented in ``esvit_swin_tiny.py`` (shared builder).
"""
from swin_ssl.config_files import config_module  # sibling config files, from any working directory

common = config_module("common")
esvit_swin_tiny = config_module("esvit_swin_tiny")


def _boosted300(c):
    c.total_epochs = 300.0
    esvit_swin_tiny.set_batch_size(c, 1024)
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_epochs = 30
    c.dino.norm_last_layer = False


PRESETS = {
    "vanilla100": lambda c: None,
    "boosted300": _boosted300,
    "demo": lambda c: esvit_swin_tiny.demo(c, model="vit_test"),
    "smoke": lambda c: esvit_swin_tiny.smoke(c, model="vit_test"),
}


def get_config(arg: str | None = None):
    c = esvit_swin_tiny.esvit_config("vit_small", objective="dino", epochs=100, batch_size=512, drop_path=0.1,
                                     window=None, norm_last_layer=True, teacher_temp=0.04,
                                     warmup_teacher_temp_epochs=0)
    return common.apply_preset(c, arg or "vanilla100", PRESETS)

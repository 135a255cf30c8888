r"""Linear probe of a frozen backbone: ``python evaluate.py --config configs/linear.py:<preset>``.

Presets:
  esvit        EsViT protocol: EMA teacher, average-pooled outputs of the last 4 blocks concatenated (2304-d
               Swin-T), linear layer normal(0, 0.01), SGD momentum 0.9, lr 1e-3 x batch/256, cosine (per epoch),
               100 epochs, no weight decay, plain CE; batch 1024 (256 x 4 GPUs). Default. (Reported 78.0 Swin-T W7.)
  dino         the same protocol for ViT-S/16 (CLS of the last 4 blocks, 1536-d; reported 77.0).
  moby         MoBY protocol (docs/fidelity.md): online encoder, pooled 768-d features, backbone in train mode
               (drop path 0.2 active), label smoothing 0.1, Nesterov SGD lr 1.0 x batch/512, 5 warmup epochs,
               per-step cosine, grad clip 5, 100 epochs, batch 512. (Reported 75.0 / 75.3 for 300-epoch Swin-T.)
  fmnist       EsViT protocol on Fashion-MNIST with ``swin_nano``, cached centre-crop features, 30 epochs.
  fmnist_moby  MoBY protocol on Fashion-MNIST, cached features, 30 epochs.
  smoke        ``swin_test`` at random init, synthetic data, 2 epochs (tests).

``linear.mode``: "augment" (the faithful protocol: RandomResizedCrop + flip of the training images through the frozen
backbone every epoch) or "cached" (features of the centre-crop images extracted once; much faster, no augmentation
and no stochastic depth: expect somewhat lower numbers). ``linear.lrs``: base learning rates to sweep in one pass
(vmapped classifiers); empty = the protocol's single base lr. The reported ``linear/top1`` is the best test accuracy
over epochs (as EsViT/DINO/MoBY report it) of the best lr -- optimistic, like the papers' numbers.
"""
import ml_collections

from swin_ssl.config_files import config_module  # sibling config files, from any working directory
from swin_ssl.evaluators.linear import protocol_defaults

knn_config = config_module("knn")


def _linear_block(protocol: str, **kw) -> ml_collections.ConfigDict:
    d = protocol_defaults(protocol)
    d.update(mode="augment", lrs=(), eval_every_epochs=1, crop_scale=(0.08, 1.0))
    d.update(kw)
    return ml_collections.ConfigDict(d)


def _apply_protocol(c, protocol: str, **kw):
    c.linear = _linear_block(protocol, **kw)
    c.network = c.linear.network
    c.feature = c.linear.feature
    c.n_last_blocks = c.linear.n_last_blocks


def _esvit(c):
    _apply_protocol(c, "esvit")
    c.model.norm_eps = 1e-6


def _dino(c):
    _apply_protocol(c, "dino")
    c.model.name = "vit_small"
    c.model.norm_eps = 1e-6


def _moby(c):
    _apply_protocol(c, "moby")
    knn_config.moby_eval(c)
    c.model.drop_path_rate = 0.2  # stochastic depth stays active in MoBY's frozen backbone (train mode)


def _fmnist(c, protocol="esvit"):
    knn_config.tiny(c, "fmnist")
    _apply_protocol(c, protocol, mode="cached", epochs=30, batch_size=256)


def _smoke(c):
    knn_config.tiny(c, "smoke")
    _apply_protocol(c, "esvit", mode="cached", epochs=2, batch_size=16)


PRESETS = {"esvit": _esvit, "dino": _dino, "moby": _moby, "fmnist": _fmnist,
           "fmnist_moby": lambda c: _fmnist(c, "moby"), "smoke": _smoke}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = knn_config.base_config("linear")
    c.model.drop_path_rate = 0.0
    return knn_config.apply_preset(c, arg, PRESETS, "esvit")

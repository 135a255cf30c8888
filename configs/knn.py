r"""k-NN evaluation of a backbone (DINO/EsViT protocol): ``python evaluate.py --config configs/knn.py``.

Weighted k-NN on L2-normalised pooled features, cosine similarity, weights exp(sim / 0.07), k in {10, 20, 100, 200}
(the papers quote k = 20); every train image is in the bank, every test image queried once.

Presets (``--config configs/knn.py:<preset>``):
  esvit   Swin-T teacher (EMA) of an EsViT run on ImageNet-1K (TFDS ``imagenet2012``, 224 centre crops). Default.
          (Reported k-NN top-1: 75.7 Swin-T W7 V+R, 74.2 view-only.)
  dino    ViT-S/16 teacher (DINO; reported 74.5 for the released ViT-S/16).
  moby    Swin-T online encoder of a MoBY run (MoBY reports no k-NN; the online net is its evaluation network).
  fmnist  ``swin_nano`` on Fashion-MNIST (60k bank, 10k queries, 32 px); give --config.checkpoint_dir (network
          "default": the objective's evaluation network) or use --config.init=random_init. With --config.feature=raw_pixels: the raw-pixel baseline (85.8 k=1 / 84.6 k=20).
  smoke   ``swin_test`` at random init on a small synthetic set: every code path in seconds (tests).

Examples::

    python evaluate.py --config configs/knn.py:esvit --config.checkpoint_dir runs/esvit_swin_t --workdir runs/esvit_swin_t/knn
    python evaluate.py --config configs/knn.py:esvit --config.init=params_file \
        --config.params_path converted/esvit_swin_tiny_w7.npz --workdir runs/knn_official
    python evaluate.py --config configs/knn.py:fmnist --config.feature=raw_pixels --workdir runs/knn_raw
"""
import ml_collections
from ml_collections import config_dict

IMAGENET_SPLITS = dict(train_split="train", test_split="validation")


def dataset(name: str, image_size: int, **kw) -> ml_collections.ConfigDict:
    """The ``config.dataset`` block (read by swin_ssl.evaluators.datasets / swin_ssl.data)."""
    d = dict(name=name, data_dir="", image_size=image_size, train_split="train", test_split="test",
             train_examples=config_dict.placeholder(int), test_examples=config_dict.placeholder(int),
             subset_seed=0, num_classes=config_dict.placeholder(int), synthetic_train=256, synthetic_test=64,
             eval_interpolation="bicubic")  # DINO/EsViT's eval resize; MoBY's is bilinear (``moby_eval``)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def base_config(mode: str) -> ml_collections.ConfigDict:
    """Fields shared by the k-NN and linear configs (schema in swin_ssl/evaluators/run.py)."""
    c = ml_collections.ConfigDict()
    c.mode = mode
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name="swin_tiny", norm_eps=config_dict.placeholder(float), window_size=config_dict.placeholder(int),
        img_size=config_dict.placeholder(int)))
    c.init = "checkpoint"                         # checkpoint | params_file | random_init
    c.checkpoint_dir = ""                         # a training workdir
    c.checkpoint_step = config_dict.placeholder(int)   # None: the latest
    c.params_path = ""                            # .npz / .msgpack / orbax dir (e.g. swin_ssl.convert output)
    c.network = "target"                          # target (EMA teacher) | online | default (checkpoint decides)
    c.feature = "pooled"                          # pooled | last_blocks | cls_avgpool | raw_pixels
    c.n_last_blocks = 4
    c.dataset = dataset("imagenet2012", 224, num_classes=1000, **IMAGENET_SPLITS)
    c.batch_size = 256                            # feature-extraction batch (multiple of the device count)
    return c


def tiny(c: ml_collections.ConfigDict, which: str) -> None:
    """CPU presets shared with configs/linear.py: ``fmnist`` and ``smoke``."""
    if which == "fmnist":
        c.model.name = "swin_nano"
        c.network = "default"  # a training workdir's objective decides: MoBY online, EsViT/DINO teacher
        c.dataset = dataset("fashion_mnist", 32)
        c.batch_size = 512
    elif which == "smoke":
        c.model.name = "swin_test"
        c.init = "random_init"
        c.dataset = dataset("synthetic", 32, num_classes=4, synthetic_train=40, synthetic_test=21)
        c.batch_size = 16
    else:
        raise ValueError(which)


def _esvit(c):
    c.model.norm_eps = 1e-6  # EsViT's Swin uses LayerNorm eps 1e-6


def _dino(c):
    c.model.name = "vit_small"
    c.model.norm_eps = 1e-6


def moby_eval(c: ml_collections.ConfigDict) -> None:
    """MoBY's evaluation: the online encoder; images resized to ``size + 32`` with torchvision's default (bilinear)
    interpolation, then centre-cropped (docs/fidelity.md)."""
    c.network = "online"
    c.dataset.eval_interpolation = "bilinear"


def _moby(c):
    moby_eval(c)


PRESETS = {"esvit": _esvit, "dino": _dino, "moby": _moby,
           "fmnist": lambda c: tiny(c, "fmnist"), "smoke": lambda c: tiny(c, "smoke")}


def apply_preset(c, arg, presets, default):
    name = (arg or default).strip()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}")
    presets[name](c)
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config("knn")
    c.knn = ml_collections.ConfigDict(dict(ks=(10, 20, 100, 200), temperature=0.07, query_chunk=256,
                                           precision="highest"))
    apply_preset(c, arg, PRESETS, "esvit")
    if c.dataset.name == "synthetic":
        c.knn.query_chunk = 16
    return c

r"""MoBY with a Swin-T backbone (Transformer-SSL ``configs/moby_swin_tiny.yaml``).

Presets (``--config configs/moby_swin_tiny.py:<preset>``):
  paper300  the official recipe: 300 epochs, batch 512, ImageNet-1K (TFDS ``imagenet2012``), AdamW lr 1e-3,
            wd 0.05, 5 warmup epochs, cosine, clip 5, drop path 0.2/0.0, queue 4096, T 0.2, momentum 0.99 -> 1.
            (Reported linear top-1: 75.0 paper / 75.3 README.) Default.
  paper100  the same for 100 epochs (reported 70.9).
  demo      ``swin_nano`` (patch 4) on Fashion-MNIST at 32 px on the CPU: 1200 steps of batch 64 (~8 min on 2 idle
            cores), heads 512->128, queue 1024, the recipe of ``_fmnist`` below (what ``make demo`` runs).
  fmnist30  the same recipe for 5500 steps at lr 5e-4 (~5.9 epochs: ~28 min at 0.30 s/step on 2 idle cores, the
            30-minute budget of ``benchmarks/fmnist.py``). README, "The demo on Fashion-MNIST", has the measured table.
  smoke     ``swin_test`` on synthetic data, a handful of steps: exercises every code path in seconds (tests).

Example::

    python train.py --config configs/moby_swin_tiny.py:smoke --workdir /tmp/moby_smoke
    python train.py --config configs/moby_swin_tiny.py:paper300 --workdir runs/moby_swin_t \
        --config.data.data_dir=/data/tfds --config.batch_size=1024
    # ImageNet as an image folder instead of TFDS:
    python train.py --config configs/moby_swin_tiny.py --config.data.name=image_folder \
        --config.data.data_dir=/data/imagenet/train --workdir runs/moby
"""
from swin_ssl.config_files import config_module  # sibling config files, from any working directory

common = config_module("common")


def _paper300(c):
    pass


def _paper100(c):
    c.total_epochs = 100.0


def _fmnist(c, steps: int):
    """``swin_nano`` on Fashion-MNIST at 32 px on the CPU. Each value that differs from the ImageNet recipe says
    why in one line; the measurements behind them are in docs/fmnist_experiments.md."""
    c.model.name = "swin_nano"
    c.model.overrides = dict(patch_size=4)  # 4x fewer tokens than patch 2: ~3-4x faster steps, better at equal time
    c.model.drop_path_rate = 0.0  # a 6-block net trained for a few epochs underfits; drop path only slows it down
    c.data = common.data_config("fashion_mnist", 32, common.FASHION_MNIST_TRAIN_EXAMPLES)  # "": system dir or cache
    c.data.crop_scale = (0.4, 1.0)  # crops of 40-100 % of a 28-px garment beat 20-100 %
    # grey images: saturation, hue and greyscale are no-ops, and hue costs input-pipeline time.
    c.data.color_jitter = (0.4, 0.4, 0.0, 0.0)
    c.data.grayscale_prob = 0.0
    c.data.blur_sigma = (0.1 * 32 / 224, 2.0 * 32 / 224)  # the official blur range scaled to 32-px views
    c.data.eval_crop_pct = 1.0  # evaluate the whole garment, as the evaluators do (training crops at scale 1)
    c.batch_size = 64
    common.scale_heads(c, hidden=512, dim=128, queue=1024)
    c.total_epochs = 1.0e9  # bounded by total_steps below
    c.total_steps = steps
    c.warmup_steps = 100
    # lr 1e-3 at batch 64 (8x the linear scaling rule, for a short run); fmnist30 uses the better 5e-4, the demo
    # keeps 1e-3, the lr its README numbers were measured with.
    c.optim.base_lr = 1e-3 * 512 / 64
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2


def _demo(c):
    _fmnist(c, steps=1200)  # ~8 min of pretraining on 2 idle cores: `make demo` stays under 15 minutes


def _fmnist30(c):
    _fmnist(c, steps=5500)  # ~28 min on 2 idle cores: the 30-minute budget of benchmarks/fmnist.py
    c.optim.base_lr = 5e-4 * 512 / 64  # beat 1e-3 on every metric at 4000 steps (docs/fmnist_experiments.md)


def _smoke(c):
    c.model.name = "swin_test"
    c.data = common.data_config("synthetic", 32, 256)
    c.batch_size = 16
    common.scale_heads(c, hidden=64, dim=32, queue=64)
    c.total_steps = 6
    c.warmup_steps = 2
    c.log_every_steps = 2
    c.checkpoint_every_steps = 3
    c.keep_checkpoints = 2


PRESETS = {"paper300": _paper300, "paper100": _paper100, "demo": _demo, "fmnist30": _fmnist30, "smoke": _smoke}


def get_config(arg: str | None = None):
    c = common.moby_config("swin_tiny", epochs=300, batch_size=512)
    return common.apply_preset(c, arg, PRESETS)

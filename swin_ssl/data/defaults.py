"""The data config's fields and their defaults per recipe (``default_config``), and the limits on untrusted
image files: what configs, validation and the pipeline share, without importing TensorFlow (so a config loads,
and a train step is built, in a process that has no TensorFlow, as on an accelerator host)."""
from __future__ import annotations

from typing import Any

import ml_collections

from swin_ssl.normalization import IMAGENET_MEAN, IMAGENET_STD

# PIL's `Image.MAX_IMAGE_PIXELS`: the size above which PIL treats a file as a decompression bomb.
MAX_IMAGE_PIXELS = 89_478_485
# A photo of MAX_IMAGE_PIXELS is ~30 MB as a JPEG; larger files are refused before they are read or decoded.
MAX_IMAGE_BYTES = 64 * 2**20
RECIPES = ("moby", "multicrop", "linear")


def default_config(augment: str = "moby", **overrides: Any) -> ml_collections.ConfigDict:
    """The data config section with every field set to the recipe's reference values (then `overrides`)."""
    if augment not in RECIPES:
        raise ValueError(f"augment must be one of {RECIPES}, got {augment!r}")
    multicrop = augment == "multicrop"
    cfg = ml_collections.ConfigDict(dict(
        source="fashion_mnist", data_dir=None, manual_dir=None, train_split="train", eval_split="validation",
        image_key="image", label_key="label",
        augment=augment,
        image_size=224,
        crop_scale=(0.4, 1.0) if multicrop else (0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        interpolation="bicubic" if multicrop else "bilinear", antialias=True,
        num_local_crops=8, local_size=96, local_scale=(0.05, 0.4),
        flip_prob=0.5,
        color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_prob=0.8,
        grayscale_prob=0.2,
        blur_sigma=(0.1, 2.0), blur_prob=(1.0, 0.1),
        solarize_prob=(0.0, 0.2), solarize_threshold=128.0,
        local_blur_prob=0.5, local_solarize_prob=0.0,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        eval_crop_pct=0.875,
        eval_interpolation="bicubic" if multicrop else "bilinear",
        shuffle_buffer=50_000, num_parallel_calls=-1, threads=0, prefetch=2,
        max_image_pixels=MAX_IMAGE_PIXELS, max_image_bytes=MAX_IMAGE_BYTES, max_skip_fraction=0.01,
        read_retries=3,
    ))
    for key, value in overrides.items():
        if key not in cfg:
            raise KeyError(f"unknown data config field {key!r}")
        setattr(cfg, key, value)
    return cfg

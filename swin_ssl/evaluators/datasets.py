"""In-memory evaluation data for the evaluators: Fashion-MNIST from its IDX files and a synthetic set.

This is a small stand-in so that the evaluators, ``evaluate.py`` and the Fashion-MNIST benchmark run
before/without the ``swin_ssl.data`` pipelines: for ImageNet (TFDS / image folders) the eval batches must
come from ``swin_ssl.data`` (centre crops, padded last batch with ``mask``); ``eval_batches`` delegates to it
for every dataset name it does not know itself.

Images are returned like the training pipeline's: float32 NHWC, 3 channels, normalised with the ImageNet
mean/std. Fashion-MNIST's 28x28 images are resized (bilinear) to ``image_size`` and replicated to 3 channels.
(The published raw-pixel baseline, 85.8 / 84.6, is on the original 784 pixels: ``fashion_mnist_raw``.)

Dataset config fields: ``name`` ("fashion_mnist" | "synthetic" | other names -> swin_ssl.data), ``data_dir``,
``image_size``, ``train_split`` / ``test_split``, ``eval_crop_pct``, ``eval_interpolation`` (pipeline datasets only), ``train_examples`` / ``test_examples`` (None or 0 = all; else a fixed random subset drawn
with ``subset_seed``), ``num_classes`` (synthetic only), ``synthetic_train`` / ``synthetic_test`` sizes, ``synthetic_noise``.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np

from swin_ssl.evaluators import common


@functools.lru_cache(maxsize=4)
def fashion_mnist_raw(split: str, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int32 [N])`` of "train" (60k) or "test" (10k), read once per process."""
    from swin_ssl.data import fashion_mnist  # the IDX reader and file lookup
    return fashion_mnist.load(split, data_dir or None)


def to_model_input(images_u8: np.ndarray, image_size: int = 32, chunk: int = 10_000) -> np.ndarray:
    """uint8 [N, h, w] grey -> float32 [N, S, S, 3]: bilinear resize of the whole image to S (torchvision
    ``Resize(S)`` with half-pixel centres, i.e. an S-px random-resized crop at scale 1: the framing the training
    crops use), replicated to 3 channels, ImageNet-normalised."""
    import jax
    import jax.numpy as jnp

    n, h, w = images_u8.shape
    resize = jax.jit(lambda x: jax.image.resize(x.astype(jnp.float32) / 255.0, (x.shape[0], image_size, image_size),
                                                "linear", antialias=True))
    out = np.empty((n, image_size, image_size, 3), np.float32)
    for start in range(0, n, chunk):
        x = images_u8[start:start + chunk]
        if (h, w) == (image_size, image_size):
            grey = x.astype(np.float32) / 255.0
        else:
            grey = np.asarray(resize(common.pad_rows(x, chunk)))[:len(x)]
        out[start:start + len(x)] = (grey[..., None] - common.IMAGENET_MEAN) / common.IMAGENET_STD
    return out


def _subset(n: int, size: int | None, seed: int) -> np.ndarray:
    if not size or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def _synthetic(cfg: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent random images (learnable, so smoke runs show above-chance accuracy)."""
    size = int(cfg.get("image_size", 32))
    classes = int(cfg.get("num_classes", 10))
    n = int(cfg.get("synthetic_train" if split == "train" else "synthetic_test", 256 if split == "train" else 64))
    protos = np.random.default_rng(1234).normal(size=(classes, size, size, 3)).astype(np.float32)
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = rng.integers(0, classes, n).astype(np.int32)
    noise = float(cfg.get("synthetic_noise", 1.5))
    images = protos[labels] + rng.normal(scale=noise, size=(n, size, size, 3)).astype(np.float32)
    return images, labels


def arrays(cfg: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 NHWC, labels int32)`` of a split, after the configured subset (cached: evaluators
    called every N training steps reuse them; treat them as read-only)."""
    keys = ("name", "data_dir", "image_size", f"{split}_examples", "subset_seed", "num_classes", "synthetic_train",
            "synthetic_test", "synthetic_noise")
    return _arrays_cached(split, tuple((k, cfg.get(k)) for k in keys))


@functools.lru_cache(maxsize=4)
def _arrays_cached(split: str, items: tuple) -> tuple[np.ndarray, np.ndarray]:
    cfg = {k: v for k, v in items if v is not None}
    images, labels = _arrays(_Cfg(cfg), split)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class _Cfg(dict):
    """A dict with attribute access (the subset of a dataset config ``_arrays`` reads)."""
    __getattr__ = dict.__getitem__


def _arrays(cfg: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    name = cfg.name
    if name == "fashion_mnist":
        raw, labels = fashion_mnist_raw(split, cfg.get("data_dir", "") or "")
        idx = _subset(len(labels), cfg.get(f"{split}_examples"), cfg.get("subset_seed", 0))
        return to_model_input(raw[idx], int(cfg.get("image_size", 32))), labels[idx]
    if name == "synthetic":
        images, labels = _synthetic(cfg, split)
        idx = _subset(len(labels), cfg.get(f"{split}_examples"), cfg.get("subset_seed", 0))
        return images[idx], labels[idx]
    raise ValueError(f"dataset {name!r} has no in-memory source here; its eval batches come from swin_ssl.data")


def num_classes(cfg: Any) -> int:
    if cfg.name == "fashion_mnist":
        return 10
    if cfg.name == "synthetic":
        return int(cfg.get("num_classes", 10))
    if cfg.get("num_classes"):
        return int(cfg.num_classes)
    if cfg.name in ("imagenet2012", "imagenet", "image_folder"):
        return 1000
    raise ValueError(f"set dataset.num_classes for dataset {cfg.name!r}")


def eval_batches(cfg: Any, split: str, batch_size: int) -> Iterator[dict]:
    """Padded eval batches ``{"image", "label", "mask"}`` covering ``split`` ("train" | "test") exactly once.

    For pipeline datasets the split names come from ``cfg.train_split`` / ``cfg.test_split`` (e.g. "validation").
    """
    if cfg.name in ("fashion_mnist", "synthetic"):
        images, labels = arrays(cfg, split)
        return common.padded_batches({"image": images, "label": labels}, batch_size)
    return _data_module_batches(cfg, split, batch_size)


def pipeline_config(cfg: Any):
    """The eval-pipeline config (``swin_ssl.data.default_config``) for this dataset block."""
    from swin_ssl import data as data_lib  # imports TensorFlow: only for pipeline datasets

    source = {"image_folder": "folder"}.get(cfg.name, cfg.name)
    return data_lib.default_config(
        "linear", source=source, data_dir=cfg.get("data_dir") or None, image_size=int(cfg.image_size),
        eval_crop_pct=float(cfg.get("eval_crop_pct", 0.875)),
        eval_interpolation=cfg.get("eval_interpolation", "bicubic"))


def _data_module_batches(cfg: Any, split: str, batch_size: int) -> Iterator[dict]:
    """ImageNet / image folders / TFDS through ``swin_ssl.data.make_eval_iterator``: this host's padded batches of
    ``batch_size / process_count`` rows (the evaluators assemble the global batch)."""
    import jax
    from swin_ssl import data as data_lib

    if batch_size % jax.process_count():
        raise ValueError(f"eval batch_size {batch_size} is not a multiple of the {jax.process_count()} processes")
    split_name = cfg.get(f"{split}_split") or split
    return iter(data_lib.make_eval_iterator(pipeline_config(cfg), batch_size_per_host=batch_size // jax.process_count(),
                                            split=split_name))


def in_memory(cfg: Any) -> bool:
    """Whether ``arrays`` serves this data set (else the ``swin_ssl.data`` pipelines do)."""
    return cfg.name in ("fashion_mnist", "synthetic")


def pipeline_train_batches(cfg: Any, batch_size: int, seed: int = 0):
    """Augmented linear-probe training batches from ``swin_ssl.data`` (recipe "linear": RandomResizedCrop + flip,
    ``crop_scale`` (0.08, 1), ``train_interpolation``): ``(batches(epoch), num_train)``. ``batches(epoch)`` yields
    this host's ``ceil(num_train / batch_size)`` batches ``{"image", "label", "mask"}`` of the next epoch of the
    pipeline's (deterministically shuffled, endless) stream."""
    import math

    import jax
    from swin_ssl import data as data_lib
    from swin_ssl.data import sources

    pcfg = pipeline_config(cfg)
    pcfg.augment = "linear"
    pcfg.crop_scale = tuple(cfg.get("crop_scale", (0.08, 1.0)))
    pcfg.interpolation = cfg.get("train_interpolation", "bilinear")
    split = cfg.get("train_split") or "train"
    pi, pc = jax.process_index(), jax.process_count()
    num_train = int(sum(sources.make_source(pcfg, split, pi, pc).host_counts))
    steps = math.ceil(num_train / batch_size)
    stream = data_lib.make_train_iterator(pcfg, batch_size_per_host=batch_size // pc, process_index=pi,
                                          process_count=pc, seed=seed, split=split)

    def batches(epoch: int):
        del epoch  # the stream carries on; each call yields the next epoch's worth of batches
        for _ in range(steps):
            b = next(stream)
            yield {"image": b["image"], "label": b["label"], "mask": np.ones(len(b["label"]), bool)}

    return batches, num_train

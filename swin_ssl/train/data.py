"""Training input for the loop: ``config.data.name == "synthetic"`` here, every real data set via ``swin_ssl.data``.

Each process reads only its own ``batch_size / process_count`` examples of every global batch; the loop turns
them into one global array (``Parallel.put_batch``). Both sources start at ``start_step`` so a resumed run sees
the batches an uninterrupted one would have seen.

The synthetic source keeps the smoke presets and the parallelism tests hermetic and exactly reproducible across
process layouts: example ``i`` of step ``s`` is a function of ``(seed, s, i)`` only (a smooth random image, fixed
per ``i % num_train_examples``, plus per-view noise, so views share content), so a 2-process run sees the same
global batch as a 1-process run while each process generates only its shard. It makes the views the recipe's
``data.augment`` asks for: ``{"view1", "view2"}`` (MoBY) or ``{"global0", "global1", "local0", ...}`` (multi-crop,
locals at ``data.local_size``).
"""
from __future__ import annotations

import os
from typing import Iterator

import ml_collections
import numpy as np

from swin_ssl import config_rules as rules

SOURCE_NAMES = {"image_folder": "folder"}  # config.data.name -> swin_ssl.data pipeline ``source``
# ``config.data`` keys beyond the pipeline's own fields (``swin_ssl.data.defaults.default_config``).
EXTRA_KEYS = ("name", "data_dir", "manual_dir", "num_train_examples")


def known_keys() -> set[str]:
    """The keys ``config.data`` may have: the pipeline's fields (both augmentations) and ``EXTRA_KEYS``."""
    from swin_ssl.data.defaults import default_config

    keys = set(EXTRA_KEYS)
    for augment in ("moby", "multicrop"):
        keys.update(default_config(augment).keys())
    return keys - {"source"}


def _check_range(key: str, value, low: float, high: float) -> None:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        rules.fail(key, value, "must be a pair (min, max)")
    if not low <= a <= b <= high:
        rules.fail(key, tuple(value), f"must satisfy {low} <= min <= max <= {high}")


def check(config: ml_collections.ConfigDict, patch_size: int) -> None:
    """The rules of ``config.data`` (sizes, crop scales, where the data is); ``patch_size`` of the backbone.

    Local crops are not at the model's configured resolution: Swin pads their token maps to whole windows (and odd
    maps before patch merging), ViT interpolates its position embedding; both need whole patches."""
    data = config.data
    rules.positive("data.image_size", data.image_size)
    rules.positive("data.num_train_examples", data.num_train_examples)
    _check_range("data.crop_scale", data.get("crop_scale", (0.08, 1.0)), 1e-6, 1.0)
    if data.get("augment", "moby") == "multicrop":
        _check_range("data.local_scale", data.get("local_scale", (0.05, 0.4)), 1e-6, 1.0)
        num_local, local, size = int(data.num_local_crops), int(data.local_size), int(data.image_size)
        if num_local < 0:
            rules.fail("data.num_local_crops", num_local, "must be >= 0")
        if num_local and (local <= 0 or local % patch_size):
            rules.fail("data.local_size", local, f"must be a positive multiple of the {config.model.name} patch "
                       f"size {patch_size}")
        if num_local and local > size:
            rules.fail("data.local_size", local, f"local crops must not be larger than the global crops "
                       f"(data.image_size={size})")
    _check_location(data)
    if data.name != "synthetic":
        from swin_ssl.data.pipeline import check_limits  # imports TensorFlow; only for real data
        check_limits(data)


def _check_location(data: ml_collections.ConfigDict) -> None:
    """The data must be where the config says (checked before anything heavy is built)."""
    name, data_dir = data.name, data.get("data_dir") or ""
    if name == "image_folder" and not data_dir:
        rules.fail("data.data_dir", data_dir, "is required for data.name='image_folder' (root of "
                   "<split>/<class>/<image>)")
    if data_dir and "://" not in data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
        rules.fail("data.data_dir", data_dir, "directory does not exist")
    if name == "fashion_mnist":
        from swin_ssl.data import fashion_mnist
        try:
            fashion_mnist.find_dir(data_dir or None)
        except ValueError as e:
            rules.fail("data.data_dir", data_dir, str(e).replace("\n", " "))


def view_sizes(data: ml_collections.ConfigDict) -> dict[str, int]:
    size = int(data.image_size)
    if data.get("augment", "moby") == "multicrop":
        views = {"global0": size, "global1": size}
        views.update({f"local{i}": int(data.local_size) for i in range(int(data.num_local_crops))})
        return views
    return {"view1": size, "view2": size}


def synthetic_example(seed: int, step: int, index: int, sizes: dict[str, int], dataset_size: int) -> dict:
    """Views of one synthetic 'image' (a 4x4 grid of random colours), float32 NHWC ~N(0, 1)."""
    coarse = np.random.default_rng([seed, index % dataset_size]).normal(size=(4, 4, 3))
    rng = np.random.default_rng([seed, step, index, 1])
    out = {}
    for name, size in sizes.items():
        image = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
        out[name] = (image + 0.5 * rng.normal(size=image.shape)).astype(np.float32)
    return out


def synthetic_iterator(data: ml_collections.ConfigDict, *, global_batch: int, process_index: int,
                       process_count: int, seed: int, start_step: int) -> Iterator[dict]:
    local = global_batch // process_count
    sizes = view_sizes(data)
    step = start_step
    while True:
        first = step * global_batch + process_index * local
        examples = [synthetic_example(seed, step, first + j, sizes, int(data.num_train_examples))
                    for j in range(local)]
        yield {v: np.stack([e[v] for e in examples]) for v in sizes}
        step += 1


def pipeline_config(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.data`` as ``swin_ssl.data.pipeline`` reads it (``source`` from ``name``, "" -> None)."""
    cfg = ml_collections.ConfigDict(data.to_dict())
    cfg.source = SOURCE_NAMES.get(data.name, data.name)
    for key in ("data_dir", "manual_dir"):
        if key in cfg and not cfg[key]:
            cfg[key] = None
    return cfg


def make_train_iterator(config: ml_collections.ConfigDict, *, process_index: int, process_count: int,
                        start_step: int) -> Iterator[dict]:
    """Host-local batches of ``config.batch_size // process_count`` examples, from ``start_step`` on."""
    kwargs = dict(process_index=process_index, process_count=process_count, seed=int(config.seed),
                  start_step=start_step)
    if config.data.name == "synthetic":
        return synthetic_iterator(config.data, global_batch=int(config.batch_size), **kwargs)
    from swin_ssl import data as data_lib  # imports TensorFlow; only for real data

    return data_lib.make_train_iterator(pipeline_config(config.data),
                                        batch_size_per_host=int(config.batch_size) // process_count, **kwargs)

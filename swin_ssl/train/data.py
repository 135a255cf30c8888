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

from typing import Iterator

import ml_collections
import numpy as np

SOURCE_NAMES = {"image_folder": "folder"}  # config.data.name -> swin_ssl.data pipeline ``source``


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

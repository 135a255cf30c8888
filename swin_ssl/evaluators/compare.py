"""Is the pretrained encoder worth anything? k-NN / linear of a checkpoint vs random init vs raw pixels.

A self-supervised encoder is worth something on a data set when its k-NN and linear accuracy beat both the
raw pixels and the same network at random initialisation (``data_and_baselines.md``). This module builds
that comparison on Fashion-MNIST (60k bank / train, 10k test; subsets optional):

* ``knn_comparison(workdir)`` -- the table ``make demo`` prints (k-NN of pretrained vs random init vs raw pixels);
* the pieces (``raw_pixel_set``, ``backbone_set``, ``knn_metrics``, ``linear_metrics``, ``format_table``) that
  ``benchmarks/fmnist.py`` combines with pretraining and linear probes.

Features are extracted once per network (the EsViT last-4-blocks concatenation; the pooled feature used by
k-NN and MoBY's linear protocol is its last ``num_features`` columns) and shared by every evaluation.
Raw pixels are the original 784 intensities in [0, 1] (the published 85.8 % k=1 / 84.6 % k=20 baseline).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from swin_ssl.evaluators import common, datasets, knn, linear, loading

PyTree = Any


@dataclasses.dataclass
class FeatureSet:
    """Frozen features of one 'method' on the train and test splits."""
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    pooled_dim: int          # the pooled feature = the last pooled_dim columns (all columns for raw pixels)
    seconds: float           # extraction time

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        return self.train_x[:, -self.pooled_dim:], self.test_x[:, -self.pooled_dim:]


def fmnist_config(image_size: int = 32, train_examples: int | None = None, test_examples: int | None = None,
                  data_dir: str = "") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(name="fashion_mnist", data_dir=data_dir, image_size=image_size,
                                          train_examples=train_examples, test_examples=test_examples, subset_seed=0))


def _subset(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    if not n or n >= len(y):
        return x, y
    idx = np.sort(np.random.default_rng(0).permutation(len(y))[:n])  # same subset rule as datasets.arrays
    return x[idx], y[idx]


def raw_pixel_set(train_examples: int | None = None, test_examples: int | None = None,
                  data_dir: str = "") -> FeatureSet:
    """The original 28x28 pixels in [0, 1], flattened (784-d)."""
    t0 = time.perf_counter()
    tx, ty = datasets.fashion_mnist_raw("train", data_dir)
    vx, vy = datasets.fashion_mnist_raw("test", data_dir)
    tx, ty = _subset(tx.reshape(len(tx), -1).astype(np.float32) / 255.0, ty, train_examples)
    vx, vy = _subset(vx.reshape(len(vx), -1).astype(np.float32) / 255.0, vy, test_examples)
    return FeatureSet("raw pixels", tx, ty, vx, vy, tx.shape[1], time.perf_counter() - t0)


def backbone_set(name: str, model: Any, params: PyTree, data_cfg: Any, *, n_last_blocks: int = 4,
                 batch_size: int = 512, mesh=None) -> FeatureSet:
    """Last-``n_last_blocks`` features (EsViT/DINO linear protocol) of the train and test splits."""
    t0 = time.perf_counter()
    n_blocks = min(n_last_blocks, _num_blocks(model))
    extractor = common.FeatureExtractor(common.make_feature_fn(model, "last_blocks", n_last_blocks=n_blocks), mesh)
    tx, ty = extractor(params, datasets.eval_batches(data_cfg, "train", batch_size))
    vx, vy = extractor(params, datasets.eval_batches(data_cfg, "test", batch_size))
    return FeatureSet(name, tx, ty, vx, vy, int(model.num_features), time.perf_counter() - t0)


def _num_blocks(model: Any) -> int:
    depths = getattr(model, "depths", None)
    return int(sum(depths)) if depths is not None else int(model.depth)


def knn_metrics(fs: FeatureSet, ks: Sequence[int] = (1, 20), mesh=None) -> dict[str, float]:
    """k-NN on the pooled feature (raw pixels: all 784)."""
    train_x, test_x = fs.pooled()
    t0 = time.perf_counter()
    m = knn.knn_classify(train_x, fs.train_y, test_x, fs.test_y, num_classes=10, ks=ks, mesh=mesh, query_chunk=1000)
    m["knn/seconds"] = time.perf_counter() - t0
    return m


def linear_metrics(fs: FeatureSet, protocol: str, *, epochs: int = 100, batch_size: int = 256,
                   lrs: Sequence[float] | None = None, mesh=None) -> dict[str, float]:
    """Cached-feature linear probe with ``protocol``'s hyper-parameters: "esvit" on the concatenated features,
    "moby" on the pooled feature. ``lrs`` (base lrs) are swept in one vmapped pass; the best is reported."""
    cfg = linear.protocol_defaults(protocol)
    cfg.update(epochs=epochs, batch_size=batch_size)
    train_x, test_x = (fs.train_x, fs.test_x) if protocol == "esvit" else fs.pooled()
    prefix = f"linear_{protocol}/"
    return linear.train_on_features(train_x, fs.train_y, test_x, fs.test_y, cfg, num_classes=10, lrs=lrs,
                                    mesh=mesh, eval_every_epochs=max(1, epochs // 10), prefix=prefix)


def load_checkpoint_backbone(workdir: str, network: str = "default") -> tuple[Any, PyTree, dict]:
    """``(model, params, meta)`` of a training workdir's latest checkpoint (model built as the trainer did)."""
    model, params, meta = loading.load_network(workdir, network)
    return model, params, dict(meta, image_size=int(meta["config"]["data"]["image_size"]))


def random_init_like(model: Any, image_size: int, seed: int = 0) -> PyTree:
    return loading.load_backbone(model, (image_size, image_size, 3), init="random_init", seed=seed)


def knn_comparison(workdir: str, *, network: str = "default", ks: Sequence[int] = (1, 20),
                   train_examples: int | None = None, test_examples: int | None = None, batch_size: int = 512,
                   data_dir: str = "", print_table: bool = True) -> list[dict]:
    """The demo's table: k-NN top-1 on Fashion-MNIST of the checkpoint in ``workdir`` vs the same network at
    random initialisation vs raw pixels. Returns one row per method (``format_table`` renders them)."""
    model, params, meta = load_checkpoint_backbone(workdir, network)
    data_cfg = fmnist_config(meta["image_size"], train_examples, test_examples, data_dir)
    label = f"{meta.get('objective', 'pretrained')} ({meta['network']}, step {meta.get('step')})"
    sets = [raw_pixel_set(train_examples, test_examples, data_dir),
            backbone_set("random init", model, random_init_like(model, meta["image_size"]), data_cfg,
                         batch_size=batch_size),
            backbone_set(label, model, params, data_cfg, batch_size=batch_size)]
    rows = []
    for fs in sets:
        m = knn_metrics(fs, ks)
        rows.append(dict(method=fs.name, **{f"k-NN k={k}": m[f"knn/top1_k{k}"] for k in ks},
                         dim=fs.pooled_dim, seconds=fs.seconds + m["knn/seconds"]))
    if print_table:
        print(format_table(rows, title=f"Fashion-MNIST k-NN top-1 (%), {len(sets[0].train_y)} train / "
                                       f"{len(sets[0].test_y)} test"))
    return rows


def format_table(rows: Sequence[dict], title: str = "") -> str:
    """Plain-text table of dict rows (floats to 2 decimals, seconds to 0)."""
    if not rows:
        return title
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(key, value):
        if isinstance(value, float):
            return f"{value:.0f}" if "second" in key or key.endswith(" s") else f"{value:.2f}"
        return "-" if value is None else str(value)

    table = [[c for c in cols]] + [[cell(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(([title] if title else []) + lines)

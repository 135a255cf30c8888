"""Weighted k-NN classification of frozen features (the DINO / EsViT protocol; docs/fidelity.md).

Protocol: features L2-normalised, cosine similarity to every training ("bank") example, the k most similar
neighbours vote with weight ``exp(sim / T)`` (T = 0.07) for their label, the class with the largest summed
weight wins. Reported for k in {10, 20, 100, 200} (k = 20 is the number the papers quote); a k larger than
the bank is clamped to the bank size.

Scale: the bank (1.28M x 768 for ImageNet) is sharded row-wise over the ``("data",)`` mesh and queries are
processed in fixed-size chunks, so one device holds ``bank/devices`` rows plus ``chunk x bank/devices``
similarities. Each device takes its local top-k (``shard_map``), the per-device candidates are all-gathered
(``devices x k`` per query) and reduced to the global top-k -- the exact result, with no device ever holding
a full similarity row.

Ties: ``lax.top_k`` puts the lower index first among equal values and the two-stage top-k preserves that
order (devices hold consecutive bank rows), so among equally similar neighbours the lower bank index wins;
among equal class scores the lower class id wins (``argmax`` semantics). Padding rows of the bank
(``bank_mask`` False) get similarity -inf and are never neighbours (k is clamped to the number of real
rows); padding queries are never counted.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from swin_ssl.evaluators import common
from swin_ssl.models.heads import l2_normalize
from swin_ssl.train.parallel import make_mesh

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def _l2_normalize(x: jax.Array) -> jax.Array:
    return l2_normalize(x.astype(jnp.float32))  # cosine similarities in float32 whatever the feature dtype


class FeatureBank:
    """The training features, L2-normalised and sharded row-wise over the mesh, with labels and a row mask."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None,
                 mesh: Mesh | None = None):
        self.mesh = mesh if mesh is not None else make_mesh()
        features = np.asarray(features, np.float32)
        labels = np.asarray(labels, np.int32)
        mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask, bool)
        if not (features.ndim == 2 and len(features) == len(labels) == len(mask)):
            raise ValueError(f"bank: features {features.shape}, labels {labels.shape}, mask {mask.shape} disagree")
        n_dev = self.mesh.devices.size
        self.num_valid = int(mask.sum())
        if self.num_valid == 0:
            raise ValueError("k-NN bank has no (unmasked) examples")
        sharding = common.row_sharded(self.mesh)
        normalize = jax.jit(_l2_normalize, out_shardings=sharding)
        self.features = normalize(common.put_global(common.pad_rows(features, n_dev), sharding))
        self.labels = common.put_global(common.pad_rows(labels, n_dev), sharding)
        self.mask = common.put_global(common.pad_rows(mask, n_dev, False), sharding)

    @property
    def rows_per_device(self) -> int:
        return self.features.shape[0] // self.mesh.devices.size


@functools.lru_cache(maxsize=32)
def _vote_fn(mesh: Mesh, rows_per_device: int, k: int, ks: tuple[int, ...], num_classes: int,
             temperature: float, num_preds: int, precision: str) -> Callable:
    """Jitted ``(bank feats, bank labels, bank mask, queries) -> class ranking [len(ks), Q, num_preds]``."""
    k_local = min(k, rows_per_device)
    prec = jax.lax.Precision[precision] if precision else None

    def local_then_global(bank, bank_labels, bank_mask, queries):
        queries = _l2_normalize(queries)
        sims = jnp.einsum("qd,nd->qn", queries, bank, precision=prec)
        sims = jnp.where(bank_mask[None, :], sims, -jnp.inf)
        values, idx = jax.lax.top_k(sims, k_local)                           # this device's candidates
        labels = bank_labels[idx]
        values = jax.lax.all_gather(values, "data", axis=1, tiled=True)      # [Q, devices * k_local]
        labels = jax.lax.all_gather(labels, "data", axis=1, tiled=True)
        values, pos = jax.lax.top_k(values, k)                               # global top-k, sorted
        labels = jnp.take_along_axis(labels, pos, axis=1)
        # exp(sim / T), scaled per query by exp(-max sim / T): the class ranking is unchanged and small
        # temperatures cannot overflow float32. exp(-inf) = 0 for masked rows.
        weights = jnp.exp((values - values[:, :1]) / temperature)
        rank = jnp.arange(k)
        rows = jnp.arange(queries.shape[0])[:, None]
        preds = []
        for kk in ks:                                                        # first kk of the sorted top-k
            w = jnp.where(rank < kk, weights, 0.0)
            scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32).at[rows, labels].add(w)
            preds.append(jax.lax.top_k(scores, num_preds)[1])
        return jnp.stack(preds)

    sharded = jax.shard_map(local_then_global, mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P()),
                            out_specs=P(), check_vma=False)
    return jax.jit(sharded)


def knn_predict(bank: FeatureBank, queries: np.ndarray, *, num_classes: int, ks: Sequence[int] = DEFAULT_KS,
                temperature: float = DEFAULT_TEMPERATURE, query_chunk: int = 256, num_preds: int = 5,
                precision: str = "highest") -> dict[int, np.ndarray]:
    """Class rankings ``{k: [num_queries, min(num_preds, num_classes)]}`` (best class first) for every query row."""
    queries = np.asarray(queries, np.float32)
    ks = tuple(int(k) for k in ks)
    effective = tuple(min(k, bank.num_valid) for k in ks)
    kmax = max(effective)
    num_preds = min(num_preds, num_classes)
    fn = _vote_fn(bank.mesh, bank.rows_per_device, kmax, effective, int(num_classes), float(temperature),
                  num_preds, precision.upper() if precision else "")
    repl = common.replicated(bank.mesh)
    out = []
    for start in range(0, len(queries), query_chunk):
        chunk = common.pad_rows(queries[start:start + query_chunk], query_chunk)
        preds = fn(bank.features, bank.labels, bank.mask, common.put_global(chunk, repl))
        out.append(np.asarray(jax.device_get(preds))[:, :min(query_chunk, len(queries) - start)])
    stacked = np.concatenate(out, axis=1) if out else np.zeros((len(ks), 0, num_preds), np.int32)
    return {k: stacked[i] for i, k in enumerate(ks)}


def knn_classify(bank_features: np.ndarray, bank_labels: np.ndarray, query_features: np.ndarray,
                 query_labels: np.ndarray, *, num_classes: int, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = DEFAULT_TEMPERATURE, bank_mask: np.ndarray | None = None,
                 query_mask: np.ndarray | None = None, mesh: Mesh | None = None, query_chunk: int = 256,
                 precision: str = "highest", prefix: str = "knn/") -> dict[str, float]:
    """Weighted k-NN accuracy: ``{prefix + "top1_k20": %, prefix + "top5_k20": %, ..., prefix + "num_queries": n}``.

    Accuracies are percentages over the unmasked queries. ``top5`` uses min(5, num_classes) classes.
    """
    bank = FeatureBank(bank_features, bank_labels, bank_mask, mesh)
    query_labels = np.asarray(query_labels)
    qmask = np.ones(len(query_labels), bool) if query_mask is None else np.asarray(query_mask, bool)
    preds = knn_predict(bank, np.asarray(query_features)[qmask], num_classes=num_classes, ks=ks,
                        temperature=temperature, query_chunk=query_chunk, precision=precision)
    return accuracy_metrics(preds, query_labels[qmask], prefix)


def accuracy_metrics(preds: Mapping[int, np.ndarray], labels: np.ndarray, prefix: str = "knn/") -> dict[str, float]:
    labels = np.asarray(labels)
    n = len(labels)
    metrics: dict[str, float] = {}
    for k, ranking in preds.items():
        metrics[f"{prefix}top1_k{k}"] = 100.0 * float(np.mean(ranking[:, 0] == labels)) if n else math.nan
        metrics[f"{prefix}top5_k{k}"] = 100.0 * float(np.mean((ranking == labels[:, None]).any(1))) if n else math.nan
    metrics[f"{prefix}num_queries"] = float(n)
    return metrics


class KnnEvaluator:
    """k-NN of a backbone: extract bank (train) and query (test) features, then ``knn_classify``.

    Used by ``evaluate.py`` (full splits) and, on configured subsets, by the trainer every N steps
    (``in_training_knn``). ``train_batches`` / ``test_batches`` are zero-argument callables that return a
    fresh iterable of padded eval batches ``{"image", "label", "mask"}`` (centre crops, no augmentation).
    """

    def __init__(self, feature_fn: Callable[..., jax.Array], train_batches: Callable[[], Iterable],
                 test_batches: Callable[[], Iterable], *, num_classes: int, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = DEFAULT_TEMPERATURE, mesh: Mesh | None = None, query_chunk: int = 256,
                 precision: str = "highest", prefix: str = "knn/"):
        self.mesh = mesh if mesh is not None else make_mesh()
        self.extractor = common.FeatureExtractor(feature_fn, self.mesh)
        self.train_batches, self.test_batches = train_batches, test_batches
        self.kwargs = dict(num_classes=num_classes, ks=tuple(ks), temperature=temperature, mesh=self.mesh,
                           query_chunk=query_chunk, precision=precision, prefix=prefix)

    def __call__(self, params: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        bank_x, bank_y = self.extractor(params, self.train_batches())
        query_x, query_y = self.extractor(params, self.test_batches())
        t1 = time.perf_counter()
        metrics = knn_classify(bank_x, bank_y, query_x, query_y, **self.kwargs)
        prefix = self.kwargs["prefix"]
        metrics[f"{prefix}bank_size"] = float(len(bank_y))
        metrics[f"{prefix}extract_seconds"] = t1 - t0
        metrics[f"{prefix}knn_seconds"] = time.perf_counter() - t1
        return metrics


def training_model(config: Any):
    """The backbone as the trainer builds it from a training config (name, ``model.overrides``, image size)."""
    from swin_ssl.models import from_config

    return from_config(config.model, int(config.data.image_size))


def eval_dataset_for(config: Any, train_examples: int | None, test_examples: int | None,
                     dataset: Mapping[str, Any] | None = None):
    """The k-NN data of a training config: its data set (Fashion-MNIST / synthetic / pipeline datasets) at its
    image size, on fixed random subsets of ``train_examples`` bank and ``test_examples`` query images."""
    import ml_collections

    d = dict(name=config.data.name, data_dir=config.data.get("data_dir", "") or "",
             image_size=int(config.data.image_size), train_split="train", test_split="validation",
             train_examples=train_examples, test_examples=test_examples, subset_seed=0,
             eval_interpolation=config.data.get("eval_interpolation", "bicubic"))  # the objective's eval resize
    if config.data.name == "synthetic":
        d.update(num_classes=4, synthetic_train=train_examples or 64, synthetic_test=test_examples or 32)
    d.update(dict(dataset or {}))
    return ml_collections.ConfigDict(d)


def in_training_knn(config: Any, params: Mapping[str, Any], step: int, workdir: str = "", *,
                    network: str = "default", feature: str = "pooled", ks: Sequence[int] = (20,),
                    temperature: float = DEFAULT_TEMPERATURE, train_examples: int | None = 10_000,
                    test_examples: int | None = 2_000, batch_size: int = 256, query_chunk: int = 256,
                    dataset: Mapping[str, Any] | None = None, prefix: str = "knn/") -> dict[str, float]:
    """The trainer's evaluation hook (``config.evals.fn = "swin_ssl.evaluators.knn:in_training_knn"``).

    Called by ``swin_ssl.train.loop`` as ``fn(config=..., params={"online", "target", "default"}, step=...,
    workdir=..., **config.evals.kwargs)`` every ``config.evals.every_steps`` steps; returns the k-NN metrics of
    the chosen ``network`` on a fixed subset of the training config's data set. Later calls reuse the loaded
    subsets (``datasets.arrays``) and the compiled functions (jax.jit's cache: the feature function and the vote
    are values). ``train_examples`` / ``test_examples`` = None: whole splits.
    """
    from swin_ssl.evaluators import datasets

    del workdir
    data_cfg = eval_dataset_for(config, train_examples, test_examples, dataset)
    evaluator = make_in_training_knn(data_cfg, training_model(config), feature=feature, ks=ks,
                                     temperature=temperature, batch_size=batch_size, query_chunk=query_chunk,
                                     prefix=prefix, num_classes=datasets.num_classes(data_cfg))
    metrics = evaluator(params[network])
    logging.info("k-NN (%s network) at step %d: %s", network, step,
                 {k: round(v, 3) for k, v in metrics.items() if "top" in k})
    return metrics


def make_in_training_knn(data_cfg: Any, model: Any, *, feature: str = "pooled", n_last_blocks: int = 4,
                         ks: Sequence[int] = (20,), temperature: float = DEFAULT_TEMPERATURE, batch_size: int = 256,
                         query_chunk: int = 256, prefix: str = "knn/", num_classes: int | None = None,
                         mesh: Mesh | None = None) -> KnnEvaluator:
    """A ``KnnEvaluator`` over the train/test splits of ``data_cfg`` (see ``swin_ssl.evaluators.datasets``)."""
    from swin_ssl.evaluators import datasets

    n_dev = (mesh.devices.size if mesh is not None else jax.device_count())
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    train_batches = functools.partial(datasets.eval_batches, data_cfg, "train", batch_size)
    test_batches = functools.partial(datasets.eval_batches, data_cfg, "test", batch_size)
    feature_fn = common.make_feature_fn(model, feature, n_last_blocks=n_last_blocks)
    return KnnEvaluator(feature_fn, train_batches, test_batches,
                        num_classes=num_classes or datasets.num_classes(data_cfg), ks=tuple(ks),
                        temperature=temperature, mesh=mesh, query_chunk=query_chunk, prefix=prefix)

"""Shared pieces of the evaluators: the data mesh, padded in-memory batches and feature extraction.

Evaluation must see every example exactly once, on any number of devices. Eval batches therefore have a
fixed size (so one compiled function serves every batch) and carry a boolean ``mask`` that is False on
padding; the padded rows are computed like any other row and dropped on the host afterwards by the mask.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from swin_ssl import normalization
from swin_ssl.train.parallel import make_mesh

PyTree = Any
Batch = Mapping[str, Any]

IMAGENET_MEAN = np.array(normalization.IMAGENET_MEAN, np.float32)
IMAGENET_STD = np.array(normalization.IMAGENET_STD, np.float32)

# Feature kinds an evaluator can read off the backbone (``model.apply`` returns ``(out, features)``):
#   pooled       final-norm, average-pooled last-stage tokens (Swin) / normed CLS (ViT) -- k-NN, MoBY linear
#   last_blocks  the last ``n_last_blocks`` entries of ``features["block_pooled"]`` concatenated: EsViT's
#                linear protocol for Swin (2304-d for Swin-T with n=4), DINO's for ViT (CLS of the last n blocks)
#   cls_avgpool  DINO's ViT-B variant: CLS of the last block ++ average of the final patch tokens
#   raw_pixels   the flattened input image (baseline); see ``raw_pixel_features``
FEATURE_KINDS = ("pooled", "last_blocks", "cls_avgpool", "raw_pixels")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def row_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over "data", the rest replicated."""
    return NamedSharding(mesh, P("data"))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global array with ``sharding`` (multi-host safe)."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def pad_rows(x: np.ndarray, multiple: int, value: Any = 0) -> np.ndarray:
    """Pads axis 0 up to a multiple of ``multiple`` with ``value``."""
    extra = (-x.shape[0]) % multiple
    if extra == 0:
        return x
    pad = np.full((extra,) + x.shape[1:], value, dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)


def padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict]:
    """Fixed-size batches over in-memory arrays; the last one is padded (zeros, label -1: the data contract) and
    ``mask`` marks the real rows.

    A stand-in for the ``swin_ssl.data`` eval pipelines on data that fits in memory (tests, Fashion-MNIST,
    cached features): same batch format ``{..., "mask"}`` and the same exactly-once guarantee.
    """
    n = len(next(iter(arrays.values())))
    if any(len(v) != n for v in arrays.values()):
        raise ValueError(f"padded_batches: arrays of different lengths {[len(v) for v in arrays.values()]}")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = {k: pad_rows(np.asarray(v[start:stop]), batch_size, -1 if k == "label" else 0)
                 for k, v in arrays.items()}
        batch["mask"] = np.arange(batch_size) < stop - start
        yield batch


def raw_pixel_features(images: jax.Array, denormalize: bool = True) -> jax.Array:
    """Flattened pixels. With ``denormalize`` the ImageNet mean/std normalisation of the pipeline is undone first,
    so cosine similarity is computed on [0, 1] intensities as in the usual raw-pixel k-NN baseline (cosine is
    invariant to scale, not to the per-channel shift the normalisation adds)."""
    x = images.astype(jnp.float32)
    if denormalize and x.shape[-1] == 3:
        x = x * IMAGENET_STD + IMAGENET_MEAN
    return x.reshape(x.shape[0], -1)


def select_features(features: Mapping[str, Any], kind: str, n_last_blocks: int = 4) -> jax.Array:
    """Reads one feature kind off the backbone's ``features`` dict (see FEATURE_KINDS)."""
    if kind == "pooled":
        return features["pooled"]
    if kind == "last_blocks":
        blocks = features["block_pooled"]
        if len(blocks) < n_last_blocks:
            raise ValueError(f"last_blocks: the model has {len(blocks)} blocks, fewer than n_last_blocks={n_last_blocks}")
        return jnp.concatenate(blocks[-n_last_blocks:], axis=-1)
    if kind == "cls_avgpool":
        tokens = features["tokens"]
        return jnp.concatenate([features["block_pooled"][-1], tokens.mean(axis=(1, 2))], axis=-1)
    raise ValueError(f"unknown feature kind {kind!r}; known: {FEATURE_KINDS}")


@dataclasses.dataclass(frozen=True)
class FeatureFn:
    """``fn(params, images, rng) -> [B, D]`` float32 features. A value (hashable, equal when built alike), so a
    jitted function taking it as a static argument compiles once per model and feature kind."""
    model: Any | None
    kind: str = "pooled"
    n_last_blocks: int = 4
    train: bool = False
    denormalize_pixels: bool = True

    def __call__(self, params: PyTree, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        if self.kind == "raw_pixels":
            return raw_pixel_features(images, self.denormalize_pixels)
        rngs = {"dropout": rng} if (self.train and rng is not None) else None
        _, feats = self.model.apply({"params": params}, images, train=self.train, rngs=rngs)
        return select_features(feats, self.kind, self.n_last_blocks).astype(jnp.float32)


def make_feature_fn(model: Any | None, kind: str = "pooled", *, n_last_blocks: int = 4, train: bool = False,
                    denormalize_pixels: bool = True) -> FeatureFn:
    """``fn(params, images, rng) -> [B, D]`` float32 features; not jitted (callers jit it inside their step).

    ``train=True`` runs the backbone in training mode (stochastic depth active), as MoBY's linear evaluation
    does with its online encoder; then ``rng`` feeds the "dropout" stream. ``kind="raw_pixels"``
    needs no model and ignores ``params``.
    """
    if kind != "raw_pixels" and model is None:
        raise ValueError(f"feature kind {kind!r} needs a model")
    return FeatureFn(model, kind, n_last_blocks, train, denormalize_pixels)


def to_host(x: jax.Array) -> np.ndarray:
    """Global array -> NumPy on every host (gathers the shards of other processes on multi-host runs)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _extract(feature_fn: Callable[..., jax.Array], mesh: Mesh, params: PyTree, images: jax.Array,
             labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Features of one sharded batch; compiled once per (feature function, mesh, shapes) by jax.jit's cache."""
    data = row_sharded(mesh)
    out = (feature_fn(params, images, None), labels, mask)
    return tuple(jax.lax.with_sharding_constraint(x, data) for x in out)


class FeatureExtractor:
    """Jitted feature extraction over padded eval batches ``{"image", "label", "mask"}``.

    The batch is sharded over the mesh's "data" axis and the parameters replicated, so the batch size must
    be a multiple of the device count. One compilation serves every batch (fixed padded shape).
    ``__call__`` returns ``(features [N, D] float32, labels [N] int32)`` for the real rows only, in input
    order: each example exactly once.
    """

    def __init__(self, feature_fn: Callable[..., jax.Array], mesh: Mesh | None = None):
        self.mesh = mesh if mesh is not None else make_mesh()
        self._feature_fn = feature_fn

    def batch(self, params: PyTree, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Device-side ``(features, labels, mask)`` of one padded batch (still padded, still sharded).

        ``batch`` is this process's part of the global batch (all of it on a single host)."""
        images = np.asarray(batch["image"], np.float32)
        n_local = len(self.mesh.local_devices)
        if images.shape[0] % n_local:
            raise ValueError(f"eval batch of {images.shape[0]} rows is not a multiple of the {n_local} local devices")
        labels = np.asarray(batch["label"], np.int32)
        mask = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(images.shape[0], bool)
        data = row_sharded(self.mesh)
        arrays = [jax.make_array_from_process_local_data(data, a) for a in (images, labels, mask)]
        return _extract(self._feature_fn, self.mesh, params, *arrays)

    def __call__(self, params: PyTree, batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
        params = jax.device_put(params, replicated(self.mesh))
        feats, labels = [], []
        for batch in batches:
            f, y, m = (to_host(a) for a in self.batch(params, batch))
            feats.append(f[m])
            labels.append(y[m])
        if not feats:
            raise ValueError("feature extraction got no batches")
        return np.concatenate(feats), np.concatenate(labels)

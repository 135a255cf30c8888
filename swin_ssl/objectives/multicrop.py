"""Multi-crop forward: crops grouped by resolution, one backbone pass per group, crop-major outputs.

A multi-crop batch is a dict ``{"global0", "global1", "local0", ..., "local{N-1}"}`` of ``[B, H, W, C]``
arrays (``swin_ssl/data``). The official wrappers (DINO's ``MultiCropWrapper``, EsViT's Swin ``forward``)
group *consecutive* crops of equal width, concatenate each group on the batch axis, run the backbone once
per group and concatenate the outputs crop-major (``[crop0 B, crop1 B, ...]``), globals first (the losses rely on that order).

Here the crops of a group are interleaved *image-major* instead (``stack(axis=1)`` then merge ``[B, n]`` into
``B n``): one backbone call per group, the same per-sample arithmetic as the official concatenation (the
backbones are per-sample networks: LayerNorm, no BatchNorm), outputs un-permuted to crop-major. The reason is
sharding: with the batch axis sharded over the ``"data"`` mesh axis, merging ``[B, n]`` keeps the sharded axis
outermost, so every device keeps its own examples; a crop-major concatenation makes XLA reshuffle the batch
(all-to-all), and ``jax.vmap`` over a crop axis is worse -- the batched patch-embedding convolution merges the
vmapped axis into the sharded batch axis and XLA all-gathers the input, so every device computes the whole
batch (checked on the compiled HLO of 8 simulated devices). Swin runs the 96-px local crops through its
padding path (``swin_ssl/models/swin.py``); ViT interpolates its position embedding.

Region (token) features are returned *per image*: ``[B, T, D]`` with ``T = sum_v N_v`` the tokens of all
crops of that image, crop-major inside the image. Keeping the batch axis leading makes the token matching
and the gather of the teacher targets batched over ``B`` (local to a device when the batch is sharded).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np

_CROP = re.compile(r"^(global|local)(\d+)$")


def crop_names(batch: Mapping[str, Any]) -> list[str]:
    """The crop keys of a batch in the official order: global0, global1, ..., then local0, local1, ...

    Other keys (labels, masks) are ignored; at least one global crop is required.
    """
    found = []
    for key in batch:
        m = _CROP.match(key)
        if m:
            found.append((0 if m.group(1) == "global" else 1, int(m.group(2)), key))
    names = [key for _, _, key in sorted(found)]
    if not names or not names[0].startswith("global"):
        raise ValueError(f"multi-crop batch needs keys global0, global1, ... (and optionally local0, ...); "
                         f"got {sorted(batch)}")
    return names


def num_global_crops(names: Sequence[str]) -> int:
    return sum(1 for n in names if n.startswith("global"))


def group_by_resolution(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive crops with equal image shape (the official grouping)."""
    groups, start = [], 0
    for i in range(1, len(shapes) + 1):
        if i == len(shapes) or tuple(shapes[i]) != tuple(shapes[start]):
            groups.append((start, i))
            start = i
    return groups


def multicrop_forward(apply_fn: Callable[..., tuple[jax.Array, dict]], crops: Sequence[jax.Array],
                      rng: jax.Array | None = None, with_tokens: bool = True):
    """Runs ``apply_fn(images, rng) -> (out, features)`` once per resolution group.

    Args:
      apply_fn: the backbone, e.g. ``lambda x, r: model.apply({"params": p}, x, train=True, rngs=...)``;
        ``rng`` is ``None`` when the caller passes none.
      crops: crop arrays in crop order (:func:`crop_names`), each ``[B, H_v, W_v, C]``.
      rng: split into one key per group (stochastic depth draws per-sample masks within a call).
      with_tokens: also return the per-image region tokens.

    Returns:
      ``pooled`` ``[V, B, D]`` (crop-major; ``reshape(V * B, D)`` is the official concatenation),
      ``tokens`` ``[B, T, D]`` (or ``None``) and ``tokens_per_crop`` (a tuple of ``N_v = h_v * w_v``).
    """
    groups = group_by_resolution([c.shape for c in crops])
    keys = None if rng is None else jax.random.split(rng, len(groups))
    pooled, tokens, counts = [], [], []
    for g, (start, end) in enumerate(groups):
        n = end - start
        # image-major batch (see the module docstring): the n crops of one image are neighbours
        images = einops.rearrange(jnp.stack(crops[start:end]), "n b h w c -> (b n) h w c")
        _, feats = apply_fn(images, None if keys is None else keys[g])
        pooled.append(einops.rearrange(feats["pooled"], "(b n) d -> n b d", n=n))
        if with_tokens:  # crop-major inside an image
            tokens.append(einops.rearrange(feats["tokens"], "(b n) h w d -> b (n h w) d", n=n))
            counts += [feats["tokens"].shape[1] * feats["tokens"].shape[2]] * n
    pooled = jnp.concatenate(pooled, axis=0)
    if not with_tokens:
        return pooled, None, ()
    return pooled, jnp.concatenate(tokens, axis=1), tuple(counts)


def token_crop_ids(tokens_per_crop: Sequence[int]) -> np.ndarray:
    """``[T]`` crop index of every token in the per-image layout of :func:`multicrop_forward`."""
    return np.repeat(np.arange(len(tokens_per_crop)), tokens_per_crop)

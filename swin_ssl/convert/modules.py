"""The Flax modules a checkpoint is loaded into (backbone from ``create_model``, MoBY / DINO heads) and their
variables' shapes."""
from __future__ import annotations

from typing import Mapping

import numpy as np


def build_backbone(model: str, model_kwargs: Mapping | None = None):
    """The backbone of a converted file's ``meta`` (``model`` + ``model_kwargs``, which may set ``img_size``)."""
    from swin_ssl.models import from_config
    return from_config({"name": model, "overrides": dict(model_kwargs or {})}, None)


def build_head(spec: Mapping):
    from swin_ssl.models import DINOHead, MoBYMLP
    return {"MoBYMLP": MoBYMLP, "DINOHead": DINOHead}[spec["type"]](**spec["kwargs"])


def input_size(module) -> tuple[int, int]:
    from swin_ssl.models import input_size as configured
    return configured(module)


def init_variables(module, in_dim: int | None = None, seed: int = 0, abstract: bool = True):
    """Variables of a backbone (from its configured image size) or a head (from ``in_dim``); shapes only if abstract."""
    import jax
    import jax.numpy as jnp
    if in_dim is None:
        x = jnp.zeros((1, *input_size(module), module.in_chans), jnp.float32)
        fn = lambda: module.init({"params": jax.random.PRNGKey(seed)}, x)  # noqa: E731
    else:
        x = jnp.zeros((2, in_dim), jnp.float32)
        fn = lambda: module.init({"params": jax.random.PRNGKey(seed)}, x, train=False)  # noqa: E731
    out = jax.eval_shape(fn) if abstract else jax.tree_util.tree_map(np.asarray, jax.jit(fn)())
    return {k: v for k, v in dict(out).items() if k in ("params", "batch_stats")}

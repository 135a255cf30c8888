"""Projection heads: MoBY's BN-MLP (projector / predictor) and DINO's weight-normalised head.

Parameter layouts follow the official checkpoints so they convert by renaming:
``projector.linear_hidden.{1,2}`` -> ``hidden_0`` (Dense) / ``bn_0`` (BatchNorm), ``linear_out`` -> ``linear_out``;
DINO ``head.mlp.{0,2,4}`` -> ``mlp_{0,1,2}``, ``head.last_layer.weight_v|weight_g`` -> ``last_layer/kernel_v|scale_g``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from swin_ssl.models.swin import dense_init, exact_gelu, torch_default_uniform

Dtype = Any


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class MoBYMLP(nn.Module):
    """in -> [Linear, BatchNorm, ReLU] x (num_layers - 1) -> Linear -> out (no BN/ReLU on the output).

    BatchNorm uses batch statistics whenever ``train`` is set, for the online *and* the target branch (the
    official model runs entirely in train mode); under ``jax.jit`` with a sharded batch the
    statistics are global (SyncBN) automatically, under ``pmap`` pass ``axis_name``. PyTorch BN momentum
    0.1 is Flax momentum 0.9. Linear layers keep PyTorch's default init (MoBYMLP applies no trunc_normal).
    """
    hidden_dim: int = 4096
    out_dim: int = 256
    num_layers: int = 2
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        for i in range(self.num_layers - 1):
            fan_in = x.shape[-1]
            x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=torch_default_uniform(fan_in),
                         bias_init=torch_default_uniform(fan_in), name=f"hidden_{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                             axis_name=self.axis_name if train else None, name=f"bn_{i}")(x)
            x = nn.relu(x)
        fan_in = x.shape[-1]
        x = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=torch_default_uniform(fan_in),
                     bias_init=torch_default_uniform(fan_in), name="linear_out")(x)
        return x.astype(jnp.float32)


class WeightNormDense(nn.Module):
    """Bias-free linear layer with weight normalisation per output unit: W[:, o] = g[o] * v[:, o] / ||v[:, o]||.

    With ``fixed_scale`` (DINO's ``norm_last_layer=True``) g is the constant 1 and not a parameter,
    so the outputs are cosine similarities to learned prototypes.
    """
    features: int
    fixed_scale: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.param("kernel_v", torch_default_uniform(x.shape[-1]), (x.shape[-1], self.features), jnp.float32)
        w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
        if not self.fixed_scale:
            w = w * self.param("scale_g", nn.initializers.ones, (self.features,), jnp.float32)
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype), preferred_element_type=jnp.float32)


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 normalise -> weight-normalised linear to ``out_dim`` prototypes."""
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        del train  # no BN in the head (use_bn_in_head=False, the official default)
        dims = [self.hidden_dim] * (self.num_layers - 1) + [self.bottleneck_dim]
        for i, dim in enumerate(dims):
            x = nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name=f"mlp_{i}")(x)
            if i < len(dims) - 1:
                x = exact_gelu(x)
        x = l2_normalize(x.astype(jnp.float32))
        return WeightNormDense(self.out_dim, fixed_scale=self.norm_last_layer, dtype=self.dtype, name="last_layer")(x)

"""ViT / DeiT (Dosovitskiy et al. 2021; Touvron et al. 2021) as one Flax Linen module.

This is the backbone of MoBY-DeiT-S and DINO. Parameter names mirror the timm/DINO state dict
(``blocks.3.attn.qkv.weight`` is ``params/blocks_3/attn/qkv/kernel``; ``cls_token``, ``pos_embed``).
The learned position embedding is stored for ``img_size``; other resolutions (96-px local crops)
interpolate its patch grid exactly as DINO's ``interpolate_pos_encoding`` does (see
:func:`resize_position_embedding` and docs/fidelity.md).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from swin_ssl.bicubic import bicubic_matrix
from swin_ssl.models.swin import DropPath, Mlp, PatchEmbed, dense_init

Dtype = Any


def resize_position_embedding(pos: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """[1, 1 + n*n, D] (CLS first) -> [1, 1 + grid_h*grid_w, D]; the CLS embedding is kept.

    DINO's rule: PyTorch bicubic (a=-0.75, no antialiasing) with ``scale_factor=(grid + 0.1) / n`` per axis; the
    0.1 makes the output exactly ``grid`` rows while output pixels map back with ``n / (grid + 0.1)``.
    """
    n = math.isqrt(pos.shape[1] - 1)
    if (grid_h, grid_w) == (n, n):
        return pos
    rows = jnp.asarray(bicubic_matrix(n, grid_h, (grid_h + 0.1) / n), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(n, grid_w, (grid_w + 0.1) / n), jnp.float32)
    grid = pos[0, 1:].reshape(n, n, pos.shape[-1]).astype(jnp.float32)
    grid = jnp.einsum("oh,hwc,pw->opc", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, grid_h * grid_w, pos.shape[-1]).astype(pos.dtype)], axis=1)


class Attention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=dense_init, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (head_dim ** -0.5), qkv[1], qkv[2]
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attention", attn)  # for visualisation (CLS attention maps)
        out = jnp.einsum("bhqk,bhkd->bqhd", attn.astype(self.dtype), v).reshape(b, n, c)
        return nn.Dense(c, dtype=self.dtype, kernel_init=dense_init, name="proj")(out)


class ViTBlock(nn.Module):
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        drop = DropPath(self.drop_path, name="drop_path")
        y = Attention(self.num_heads, self.dtype, name="attn")(nn.LayerNorm(epsilon=self.norm_eps, name="norm1")(x))
        x = x + drop(y.astype(x.dtype), train)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(
            nn.LayerNorm(epsilon=self.norm_eps, name="norm2")(x))
        return x + drop(y.astype(x.dtype), train)


class VisionTransformer(nn.Module):
    """ViT with a CLS token. ``__call__`` returns ``(out, features)`` like ``SwinTransformer``:
    ``pooled`` = normed CLS, ``tokens`` [B, h, w, D] normed patch tokens, ``block_pooled`` = the CLS token of
    every block through the final norm (DINO's ``get_intermediate_layers`` linear protocol)."""
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    img_size: int = 224
    in_chans: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    num_classes: int = 0
    dtype: Dtype = jnp.float32
    remat: bool = False  # rematerialise each block in the backward pass (less memory, same parameters/results)

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViT: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        super().__post_init__()

    @property
    def num_features(self) -> int:
        return self.embed_dim

    def check_input(self, images: jax.Array) -> None:
        if images.ndim != 4 or images.shape[-1] != self.in_chans:
            raise ValueError(f"ViT expects NHWC images [batch, height, width, {self.in_chans}], got shape {images.shape}")
        h, w = images.shape[1:3]
        if h < self.patch_size or w < self.patch_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"ViT: image {h}x{w} must be a positive multiple of the {self.patch_size}-px patch")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        self.check_input(images)
        x = PatchEmbed(self.patch_size, self.embed_dim, dtype=self.dtype, use_norm=False, name="patch_embed")(images)
        b, gh, gw, d = x.shape
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x.reshape(b, gh * gw, d).astype(jnp.float32)], axis=1)
        n = self.img_size // self.patch_size
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + n * n, d), jnp.float32)
        x = x + resize_position_embedding(pos, gh, gw)
        norm = nn.LayerNorm(epsilon=self.norm_eps, name="norm")
        rates = np.linspace(0.0, self.drop_path_rate, self.depth).tolist()
        block_pooled = []
        block = nn.remat(ViTBlock, static_argnums=(2,)) if self.remat else ViTBlock  # ``train`` is static
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, rates[i], self.norm_eps, self.dtype, name=f"blocks_{i}")(x, train)
            block_pooled.append(norm(x[:, 0]))
        x = norm(x)
        features = {"pooled": x[:, 0], "tokens": x[:, 1:].reshape(b, gh, gw, d), "block_pooled": tuple(block_pooled)}
        out = x[:, 0]
        if self.num_classes > 0:
            out = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init, name="head")(out)
            out = out.astype(jnp.float32)
        return out, features

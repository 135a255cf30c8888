"""Swin Transformer (Liu et al. 2021) as one Flax Linen module, numerically the official model.

Parameter names mirror the official PyTorch state dict (``layers.0.blocks.1.attn.qkv.weight`` is
``params/layers_0/blocks_1/attn/qkv/kernel``), so released checkpoints convert by renaming and
transposing (see ``swin_ssl/convert/layouts.py``).

Where the official repositories disagree, this module follows EsViT, which is the superset:
  * the window size and the shift of every stage are decided once from the *configured* ``img_size``
    (official rule: a stage whose feature map is no larger than the window gets no shift and a window
    equal to the map size);
  * any other input size goes through the padding path of the Swin detection/EsViT code: the image is
    zero-padded to a multiple of the patch, each block pads its normed features right/bottom to a
    multiple of the window, and PatchMerging pads odd maps. So a 96-px local crop (24x24 tokens, W=7)
    and rectangular images work. Padded tokens are *not* masked (as EsViT, whose weights were trained so; docs/fidelity.md) unless
    ``mask_padding=True``, which hides them from the attention with the same -100 bias as the shift mask.
Relative-position indices and shifted-window masks are NumPy constants built at trace time, never
variables, so checkpoints hold parameters only.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

Dtype = Any
MASK_VALUE = -100.0  # the official additive mask value (not -inf)

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute units, i.e. it is a plain normal at this std.
dense_init = nn.initializers.normal(stddev=0.02)


def torch_default_uniform(fan_in: int):
    """PyTorch's default Linear/Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def exact_gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): x * (1 + erf(x / sqrt 2)) / 2. Written with erf, as torch does: XLA's erf is a short
    polynomial, its erfc (what jax.nn.gelu uses) several times dearer on CPU."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(np.sqrt(0.5)).astype(x.dtype)))


# ----------------------------------------------------------------------------------------------
# Static geometry: NumPy constants computed once per (window, shift, map size).

@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """[W*W, W*W] index into the (2W-1)^2 bias table; entry (i, j) encodes coord(i) - coord(j)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # shift to start at 0
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """Additive mask [num_windows, W*W, W*W] for shifted-window attention on a height x width map.

    After the cyclic shift, a window can hold tokens from up to 4 of the 9 regions cut by the slices
    (0, -W), (-W, -s), (-s, end) along each axis; tokens of different regions must not attend to each other.
    Windows are ordered row-major (batch-major overall), as window_partition produces them.
    """
    labels = np.zeros((height, width), np.int32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for hs in cuts:
        for ws in cuts:
            labels[hs, ws] = region
            region += 1
    windows = partition_windows_np(labels, window)  # [nW, N]
    different = windows[:, None, :] != windows[:, :, None]
    return np.where(different, MASK_VALUE, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=None)
def padding_key_mask(height: int, width: int, padded_h: int, padded_w: int, window: int, shift: int) -> np.ndarray:
    """Additive mask [nW, N, N] that hides padded keys (used only with mask_padding=True)."""
    valid = np.zeros((padded_h, padded_w), bool)
    valid[:height, :width] = True
    valid = np.roll(valid, (-shift, -shift), axis=(0, 1))
    windows = partition_windows_np(valid, window)  # [nW, N]
    return np.where(windows[:, None, :], 0.0, MASK_VALUE).astype(np.float32).repeat(windows.shape[1], axis=1)


def partition_windows_np(grid: np.ndarray, window: int) -> np.ndarray:
    h, w = grid.shape
    return grid.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3).reshape(-1, window * window)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """[B, H, W, C] -> [B * nW, W*W, C], windows batch-major and row-major within an image."""
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window, ww=window)


def window_reverse(windows: jax.Array, window: int, h: int, w: int) -> jax.Array:
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=h // window, nw=w // window,
                     wh=window)


def stage_geometry(img_size: tuple[int, int], patch_size: int, window_size: int, num_stages: int):
    """Per stage (window, shift of odd blocks), decided from the configured resolution (official rule)."""
    h, w = -(-img_size[0] // patch_size), -(-img_size[1] // patch_size)
    geometry = []
    for _ in range(num_stages):
        if min(h, w) <= window_size:
            geometry.append((min(h, w), 0))
        else:
            geometry.append((window_size, window_size // 2))
        h, w = -(-h // 2), -(-w // 2)
    return tuple(geometry)


# ----------------------------------------------------------------------------------------------
# Layers

class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics: kept samples are divided by the keep probability)."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_dim = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
        x = exact_gelu(x)
        return nn.Dense(out_dim, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


class QKVProjection(nn.Module):
    """The official fused qkv Linear (kernel [C, 3C], bias [3C]; same parameters as ``nn.Dense(3C)``), applied as
    three [C, C] products: the backward then needs no transpose/pad of a [3, windows, heads, N, hd] gradient,
    which made up about a quarter of the attention's forward+backward time on XLA:CPU."""
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.features
        kernel = self.param("kernel", dense_init, (x.shape[-1], 3 * c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (3 * c,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return tuple(x @ kernel[:, i * c:(i + 1) * c] + bias[i * c:(i + 1) * c] for i in range(3))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""
    num_heads: int
    window: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        windows, n, c = x.shape
        head_dim = c // self.num_heads
        q, k, v = (t.reshape(windows, n, self.num_heads, head_dim).transpose(0, 2, 1, 3)  # [windows, nH, N, hd]
                   for t in QKVProjection(c, dtype=self.dtype, name="qkv")(x))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * (head_dim ** -0.5), k, preferred_element_type=jnp.float32)

        table = self.param("relative_position_bias_table", dense_init,
                           ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32)
        bias = jnp.take(table, relative_position_index(self.window).reshape(-1), axis=0)
        logits = logits + bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)[None]
        if mask is not None:  # [nW, N, N], windows batch-major
            nw = mask.shape[0]
            logits = logits.reshape(windows // nw, nw, self.num_heads, n, n) + jnp.asarray(mask)[None, :, None]
            logits = logits.reshape(windows, self.num_heads, n, n)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(windows, n, c)
        return nn.Dense(c, dtype=self.dtype, kernel_init=dense_init, name="proj")(out)


class SwinBlock(nn.Module):
    num_heads: int
    window: int
    shift: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    norm_eps: float = 1e-5
    mask_padding: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, h, w, c = x.shape
        ws, s = self.window, self.shift
        shortcut = x
        x = nn.LayerNorm(epsilon=self.norm_eps, name="norm1")(x)
        # Pad the *normed* features right/bottom to a multiple of the window (detection / EsViT semantics).
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        if (hp, wp) != (h, w):
            x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        mask = shifted_window_mask(hp, wp, ws, s) if s > 0 else None
        if self.mask_padding and (hp, wp) != (h, w):
            pad_mask = padding_key_mask(h, w, hp, wp, ws, s)
            mask = pad_mask if mask is None else mask + pad_mask
        if s > 0:
            x = jnp.roll(x, (-s, -s), axis=(1, 2))
        y = WindowAttention(self.num_heads, ws, dtype=self.dtype, name="attn")(window_partition(x, ws), mask)
        y = window_reverse(y, ws, hp, wp)
        if s > 0:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        y = y[:, :h, :w, :]
        drop = DropPath(self.drop_path, name="drop_path")
        x = shortcut + drop(y.astype(shortcut.dtype), train)
        y = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")(
            nn.LayerNorm(epsilon=self.norm_eps, name="norm2")(x))
        return x + drop(y.astype(x.dtype), train)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token; official channel order x0(0,0), x1(1,0), x2(0,1), x3(1,1)."""
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if h % 2 or w % 2:  # odd maps are padded by one row/column (detection code); official asserts even
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = nn.LayerNorm(epsilon=self.norm_eps, name="norm")(x)
        return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, kernel_init=dense_init, name="reduction")(x)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> embed_dim (a strided conv), optionally LayerNorm'd (Swin; not ViT)."""
    patch_size: int
    embed_dim: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    use_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        h, w = x.shape[1:3]
        if h % p or w % p:
            x = jnp.pad(x, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
        fan_in = p * p * x.shape[-1]
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=torch_default_uniform(fan_in), bias_init=torch_default_uniform(fan_in),
                    name="proj")(x)
        return nn.LayerNorm(epsilon=self.norm_eps, name="norm")(x) if self.use_norm else x


class SwinStage(nn.Module):
    """A stage of blocks (even blocks W-MSA, odd blocks SW-MSA) and, except the last, PatchMerging at the end."""
    depth: int
    num_heads: int
    window: int
    shift: int
    drop_path: Sequence[float]
    downsample: bool
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    mask_padding: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        block_outputs = []
        # remat: keep only each block's input for the backward pass and recompute the rest (activation memory
        # ~ one block instead of all of them, ~1/3 more compute). ``train`` (argument 2) is static.
        block = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
        for j in range(self.depth):
            x = block(self.num_heads, self.window, 0 if j % 2 == 0 else self.shift, self.mlp_ratio,
                          self.drop_path[j], self.norm_eps, self.mask_padding, self.dtype, name=f"blocks_{j}")(x, train)
            block_outputs.append(x)
        merged = PatchMerging(self.norm_eps, self.dtype, name="downsample")(x) if self.downsample else None
        return x, merged, block_outputs


class SwinTransformer(nn.Module):
    """Swin Transformer backbone (+ optional classifier). ``__call__`` returns ``(out, features)``.

    ``out`` is the logits when ``num_classes > 0`` and the pooled features otherwise. ``features``:
    ``pooled`` [B, D]; ``tokens`` [B, h, w, D] last-stage tokens after the final norm (EsViT region
    features); ``block_pooled`` one [B, d] per block, mean-pooled, the last stage's through the final
    norm (EsViT linear protocol); ``stages`` the four stage outputs before PatchMerging (FPN/UPerNet).
    """
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    img_size: int | tuple[int, int] = 224  # decides windows and shifts; other input sizes use padding
    in_chans: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5  # 1e-5 official/MoBY, 1e-6 EsViT
    num_classes: int = 0
    mask_padding: bool = False
    dtype: Dtype = jnp.float32  # computation dtype of the matmuls; params, softmax and LayerNorm stay fp32
    remat: bool = False  # rematerialise each block in the backward pass (less memory, same parameters/results)

    def __post_init__(self):
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"Swin: depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
                             "must have the same length (one entry per stage)")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ValueError(f"Swin: stage {i} width {self.embed_dim * 2 ** i} is not divisible by "
                                 f"num_heads[{i}]={heads}")
        super().__post_init__()

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def configured_size(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)

    def check_input(self, images: jax.Array) -> None:
        if images.ndim != 4:
            raise ValueError(f"Swin expects NHWC images [batch, height, width, {self.in_chans}], got shape {images.shape}")
        if images.shape[-1] != self.in_chans:
            raise ValueError(f"Swin expects {self.in_chans} input channels (NHWC), got {images.shape[-1]} "
                             f"in shape {images.shape}")
        if min(images.shape[1:3]) < self.patch_size:
            raise ValueError(f"Swin: image {images.shape[1]}x{images.shape[2]} is smaller than the "
                             f"{self.patch_size}x{self.patch_size} patch")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        self.check_input(images)
        geometry = stage_geometry(self.configured_size, self.patch_size, self.window_size, len(self.depths))
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        x = PatchEmbed(self.patch_size, self.embed_dim, self.norm_eps, self.dtype, name="patch_embed")(images)
        stages, blocks, offset = [], [], 0
        for i, depth in enumerate(self.depths):
            window, shift = geometry[i]
            stage_out, merged, block_outputs = SwinStage(
                depth, self.num_heads[i], window, shift, rates[offset:offset + depth],
                downsample=i < len(self.depths) - 1, mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps,
                mask_padding=self.mask_padding, dtype=self.dtype, remat=self.remat, name=f"layers_{i}")(x, train)
            offset += depth
            stages.append(stage_out)
            blocks.append(block_outputs)
            x = merged if merged is not None else stage_out
        norm = nn.LayerNorm(epsilon=self.norm_eps, name="norm")
        tokens = norm(x)
        pooled = tokens.mean(axis=(1, 2))
        block_pooled = [b.mean(axis=(1, 2)) for stage in blocks[:-1] for b in stage]
        block_pooled += [norm(b).mean(axis=(1, 2)) for b in blocks[-1]]
        features = {"pooled": pooled, "tokens": tokens, "block_pooled": tuple(block_pooled), "stages": tuple(stages)}
        out = pooled
        if self.num_classes > 0:
            out = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_init, name="head")(pooled)
            out = out.astype(jnp.float32)
        return out, features

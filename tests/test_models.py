"""Swin / ViT backbones: exact sizes, the official geometry constants, numerics against NumPy, sharding, errors."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from swin_ssl.models import MODEL_NAMES, create_model
from swin_ssl.models import swin as swin_lib
from swin_ssl.models import vit as vit_lib
from swin_ssl.models.heads import DINOHead, MoBYMLP


def param_count(model, size):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name,kwargs,expected", [
    ("swin_tiny", dict(num_classes=1000), 28_288_354),
    ("swin_tiny", dict(), 27_519_354),
    ("swin_small", dict(num_classes=1000), 49_606_258),
    ("swin_base", dict(num_classes=1000), 87_768_224),
    ("swin_large", dict(num_classes=1000), 196_532_476),
    ("swin_base", dict(num_classes=1000, img_size=384, window_size=12), 87_903_584),
    ("deit_small", dict(num_classes=1000), 22_050_664),
    ("deit_small", dict(), 21_665_664),
    ("vit_base", dict(num_classes=1000), 86_567_656),
])
def test_parameter_counts_match_the_official_models(name, kwargs, expected):
    size = kwargs.get("img_size", 224)
    assert param_count(create_model(name, **kwargs), size) == expected


def test_head_parameter_counts():
    # MoBY Swin-T projector 768->4096->256 and predictor 256->4096->256 (BN scale/bias counted, stats not).
    proj = MoBYMLP().init(jax.random.PRNGKey(0), jnp.zeros((2, 768)), train=False)
    pred = MoBYMLP().init(jax.random.PRNGKey(0), jnp.zeros((2, 256)), train=False)
    count = lambda v: sum(x.size for x in jax.tree.leaves(v["params"]))
    assert count(proj) == 4_206_848
    assert count(pred) == 2_109_696
    # DINO head with a trainable weight_g (norm_last_layer=False): 23,138,560 for in=768, out=65536.
    head = jax.eval_shape(lambda: DINOHead(norm_last_layer=False).init(jax.random.PRNGKey(0), jnp.zeros((1, 768))))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(head["params"])) == 23_138_560


# ------------------------------------------------------------------------------------------------
# Geometry constants of official Swin (relative-position index, shift masks, stage geometry)

def test_relative_position_index_anchors():
    idx = swin_lib.relative_position_index(7)
    assert idx.shape == (49, 49)
    assert (idx[0, 0], idx[0, 1], idx[1, 0], idx[0, 7], idx[0, 48], idx[48, 0]) == (84, 83, 85, 71, 0, 168)
    assert idx.min() == 0 and idx.max() == 168 and len(np.unique(idx)) == 169
    assert idx.sum() == 201_684
    assert (np.diag(idx) == 84).all()


@pytest.mark.parametrize("res,windows,masked_windows,entries", [(56, 64, 15, 18240), (28, 16, 7, 8832), (14, 4, 3, 4128)])
def test_shifted_window_mask_anchors(res, windows, masked_windows, entries):
    mask = swin_lib.shifted_window_mask(res, res, 7, 3)
    assert mask.shape == (windows, 49, 49)
    assert set(np.unique(mask)) == {0.0, -100.0}
    per_window = (mask == -100).sum(axis=(1, 2))
    assert (per_window > 0).sum() == masked_windows
    assert (mask == -100).sum() == entries
    assert set(per_window.tolist()) <= {0, 1176, 1776}
    assert (mask == mask.transpose(0, 2, 1)).all()


def test_region_labels_of_the_bottom_right_corner():
    # The bottom-right 8x8 of the 56x56 label map is "0 1111 222 / 3 4444 555 (x4) / 6 7777 888 (x3)".
    labels = np.zeros((56, 56), int)
    cuts = (slice(0, -7), slice(-7, -3), slice(-3, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            labels[hs, ws] = 3 * i + j
    expected = np.array([[0] + [1] * 4 + [2] * 3] + [[3] + [4] * 4 + [5] * 3] * 4 + [[6] + [7] * 4 + [8] * 3] * 3)
    np.testing.assert_array_equal(labels[-8:, -8:], expected)
    # The labels live on the already-shifted grid: the module's last (bottom-right) window allows exactly the
    # pairs of equal labels among its 4 regions.
    mask = swin_lib.shifted_window_mask(56, 56, 7, 3)[-1]
    window_labels = labels[-7:, -7:].reshape(-1)
    np.testing.assert_array_equal(mask == 0, window_labels[:, None] == window_labels[None, :])
    assert sorted(np.unique(window_labels)) == [4, 5, 7, 8]


def test_swin_tiny_stage_geometry_at_224_and_384():
    assert swin_lib.stage_geometry((224, 224), 4, 7, 4) == ((7, 3), (7, 3), (7, 3), (7, 0))  # stage 4 unshifted
    assert swin_lib.stage_geometry((384, 384), 4, 12, 4) == ((12, 6), (12, 6), (12, 6), (12, 0))
    # EsViT W14 @224: stage 3 (14x14) unshifted, stage 4 window shrinks to 7.
    assert swin_lib.stage_geometry((224, 224), 4, 14, 4) == ((14, 7), (14, 7), (14, 0), (7, 0))


# ------------------------------------------------------------------------------------------------
# Numerics: an independent NumPy implementation of the official forward pass.

def np_layernorm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_window_attention(x, p, heads, window, mask):
    """x: [nWin, N, C]; official WindowAttention.forward (q scaled before q @ k^T, bias, mask, softmax)."""
    bw, n, c = x.shape
    hd = c // heads
    qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(bw, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
    attn = q @ k.transpose(0, 1, 3, 2)
    # relative_position_index exactly as official l.100-115 (written out independently here).
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).copy()
    rel[:, :, 0] += window - 1
    rel[:, :, 1] += window - 1
    rel[:, :, 0] *= 2 * window - 1
    bias = p["relative_position_bias_table"][rel.sum(-1).reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)
    attn = attn + bias[None]
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.reshape(bw // nw, nw, heads, n, n) + mask[None, :, None]).reshape(bw, heads, n, n)
    attn = np.exp(attn - attn.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(bw, n, c)
    return out @ p["proj"]["kernel"] + p["proj"]["bias"]


def np_official_mask(hp, wp, window, shift):
    img = np.zeros((hp, wp))
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    mw = img.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3).reshape(-1, window * window)
    m = mw[:, None, :] - mw[:, :, None]
    return np.where(m != 0, -100.0, 0.0)


def np_swin_block(x, p, heads, window, shift, eps):
    b, h, w, c = x.shape
    shortcut = x
    x = np_layernorm(x, p["norm1"], eps)
    hp, wp = -(-h // window) * window, -(-w // window) * window
    x = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    if shift:
        x = np.roll(x, (-shift, -shift), axis=(1, 2))
    win = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)
    y = np_window_attention(win, p["attn"], heads, window, np_official_mask(hp, wp, window, shift) if shift else None)
    y = y.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if shift:
        y = np.roll(y, (shift, shift), axis=(1, 2))
    x = shortcut + y[:, :h, :w]
    m = p["mlp"]
    y = np_gelu(np_layernorm(x, p["norm2"], eps) @ m["fc1"]["kernel"] + m["fc1"]["bias"]) @ m["fc2"]["kernel"] + m["fc2"]["bias"]
    return x + y


def np_patch_merging(x, p, eps):
    b, h, w, c = x.shape
    x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    return np_layernorm(np.concatenate([x0, x1, x2, x3], -1), p["norm"], eps) @ p["reduction"]["kernel"]


def np_swin(images, params, model):
    eps, ps = model.norm_eps, model.patch_size
    b, h, w, _ = images.shape
    images = np.pad(images, ((0, 0), (0, -h % ps), (0, -w % ps), (0, 0)))
    hh, ww = images.shape[1] // ps, images.shape[2] // ps
    patches = images.reshape(b, hh, ps, ww, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, -1)
    kernel = params["patch_embed"]["proj"]["kernel"].reshape(-1, model.embed_dim)  # (kh, kw, in) flattening
    x = np_layernorm(patches @ kernel + params["patch_embed"]["proj"]["bias"], params["patch_embed"]["norm"], eps)
    geometry = swin_lib.stage_geometry(model.configured_size, ps, model.window_size, len(model.depths))
    for i, depth in enumerate(model.depths):
        window, shift = geometry[i]
        layer = params[f"layers_{i}"]
        for j in range(depth):
            x = np_swin_block(x, layer[f"blocks_{j}"], model.num_heads[i], window, shift if j % 2 else 0, eps)
        if i < len(model.depths) - 1:
            x = np_patch_merging(x, layer["downsample"], eps)
    x = np_layernorm(x, params["norm"], eps).mean(axis=(1, 2))
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def to_numpy(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# 20x28: padding path (image, windows, odd merge), rectangular; 32x32 (over 5 s) only in the full suite
@pytest.mark.parametrize("size", [pytest.param((32, 32), marks=pytest.mark.slow), (20, 28)])
def test_swin_matches_numpy_reimplementation(size):
    model = create_model("swin_test", num_classes=5, depths=(2, 2), num_heads=(2, 2))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, *size, 3)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(1), jnp.asarray(images))["params"]
    # Random (non-default) norm params and rel-pos tables so every parameter matters.
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), params)
    logits, _ = jax.jit(model.apply)({"params": params}, images)
    expected = np_swin(images.astype(np.float64), to_numpy(params), model)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-4)


def test_patch_merging_channel_order():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    pm = swin_lib.PatchMerging(norm_eps=1e-5)
    params = pm.init(jax.random.PRNGKey(0), x)["params"]
    # Make the reduction a pure selection of the 12 concatenated channels (4C -> 2C uses the first 6).
    kernel = np.zeros((12, 6), np.float32)
    kernel[np.arange(6), np.arange(6)] = 1.0
    params = {"norm": {"scale": np.ones(12, np.float32), "bias": np.zeros(12, np.float32)}, "reduction": {"kernel": kernel}}
    out = np.asarray(pm.apply({"params": params}, x))
    concat = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    mu, var = concat.mean(-1, keepdims=True), concat.var(-1, keepdims=True)
    np.testing.assert_allclose(out, ((concat - mu) / np.sqrt(var + 1e-5))[..., :6], atol=1e-5)
    # The naive space-to-depth order (0,0),(0,1),(1,0),(1,1) differs: channels 3..5 come from x1 = (row 1, col 0).
    np.testing.assert_allclose(out[0, 0, 0, 3:6] * np.sqrt(var[0, 0, 0] + 1e-5) + mu[0, 0, 0], x[0, 1, 0], atol=1e-3)


def test_a_token_cannot_see_across_a_shifted_region_boundary():
    # One shifted block on an 8x8 map with window 4, shift 2: after the cyclic shift, the bottom-right window holds
    # original rows/cols {6, 7} (region 2) and the wrapped-around {0, 1} (region 0).
    block = swin_lib.SwinBlock(num_heads=2, window=4, shift=2)
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 16)).astype(np.float32)
    params = block.init(jax.random.PRNGKey(0), x, train=False)
    params = jax.tree.map(lambda a: a * 20.0 if a.ndim == 2 else a, params)  # strong attention, visible effects
    x2 = x.copy()
    x2[0, 7, 7] += np.random.default_rng(1).normal(size=16)  # not a constant: LayerNorm would remove it
    y1, y2 = (np.asarray(block.apply(params, v, train=False)) for v in (x, x2))
    changed = np.abs(y1 - y2).max(-1)[0] > 1e-6
    assert not changed[0, 0] and not changed[1, 1]  # same shifted window, other region: invisible
    assert changed[6, 6] and changed[7, 6]  # same window and region: visible
    assert changed.sum() == 4  # exactly the 2x2 region {6,7} x {6,7}
    # Without the mask the wrapped tokens would see it (so the check above can fail).
    unmasked = swin_lib.SwinBlock(num_heads=2, window=4, shift=2, mask_padding=False)
    orig = swin_lib.shifted_window_mask
    try:
        swin_lib.shifted_window_mask = lambda *a: np.zeros_like(orig(*a))
        z1, z2 = (np.asarray(unmasked.apply(params, v, train=False)) for v in (x, x2))
    finally:
        swin_lib.shifted_window_mask = orig
    assert np.abs(z1 - z2).max(-1)[0, 0, 0] > 1e-6


def test_mask_padding_hides_padded_keys():
    # 6x6 map, window 4 -> padded to 8x8. With mask_padding, outputs equal those of a model run on the same
    # tokens where the padded keys are absent, so they do not depend on the (zero) padded values: compare with
    # EsViT semantics, where zero tokens after norm1 still contribute their bias K/V.
    x = np.random.default_rng(1).normal(size=(1, 6, 6, 8)).astype(np.float32)
    faithful = swin_lib.SwinBlock(num_heads=1, window=4, shift=0)
    masked = swin_lib.SwinBlock(num_heads=1, window=4, shift=0, mask_padding=True)
    params = faithful.init(jax.random.PRNGKey(0), x, train=False)
    params = jax.tree.map(lambda a: a + 0.05, params)  # nonzero qkv bias -> padded keys matter in EsViT semantics
    y_f = np.asarray(faithful.apply(params, x, train=False))
    y_m = np.asarray(masked.apply(params, x, train=False))
    # Top-left window (rows/cols 0..3) has no padding: identical. Bottom-right (4..5) has padding: different.
    np.testing.assert_allclose(y_f[0, :4, :4], y_m[0, :4, :4], atol=1e-6)
    assert np.abs(y_f[0, 4:, 4:] - y_m[0, 4:, 4:]).max() > 1e-4
    # And the masked output of the bottom-right 2x2 tokens equals attention over just those 4 tokens:
    # run the same block on a 2x2 map with window 2 (no padding) -> same tokens, same params.
    small = swin_lib.SwinBlock(num_heads=1, window=2, shift=0)
    p_small = jax.tree.map(lambda a: a, params)
    table = np.asarray(params["params"]["attn"]["relative_position_bias_table"])  # [(2*4-1)^2, 1]
    # window-4 table entries for offsets in {-1,0,1}^2 map onto the window-2 table
    t4 = table.reshape(7, 7, 1)[2:5, 2:5].reshape(9, 1)
    p_small["params"]["attn"]["relative_position_bias_table"] = t4
    y_small = np.asarray(small.apply(p_small, x[:, 4:, 4:], train=False))
    np.testing.assert_allclose(y_m[0, 4:, 4:], y_small[0], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Real sizes run (and the padding path): shapes only, the numerics are checked above.

@pytest.mark.parametrize("kwargs,shape,tokens", [
    (dict(), (224, 224), (7, 7)),
    (dict(img_size=384, window_size=12), (384, 384), (12, 12)),
    (dict(), (96, 96), (3, 3)),  # EsViT local crop: 24x24 tokens padded to 28 with W=7
    (dict(), (224, 288), (7, 9)),  # rectangular
])
@pytest.mark.slow
def test_swin_tiny_runs_on_paper_resolutions(kwargs, shape, tokens):
    model = create_model("swin_tiny", **kwargs)
    x = jnp.zeros((1, *shape, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    out, feats = jax.jit(model.apply)(params, x + 0.5)
    assert out.shape == (1, 768)
    assert feats["tokens"].shape == (1, *tokens, 768)
    assert [s.shape[1:3] for s in feats["stages"]][-1] == tokens
    assert len(feats["block_pooled"]) == 12 and feats["block_pooled"][-1].shape == (1, 768)
    assert feats["block_pooled"][-3].shape == (1, 384)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.slow
@pytest.mark.parametrize("size,grid", [(224, 14), (96, 6)])
def test_vit_small_runs_on_224_and_96(size, grid):
    model = create_model("deit_small")
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    out, feats = jax.jit(model.apply)(params, jnp.ones((2, size, size, 3)))
    assert out.shape == (2, 384)
    assert feats["tokens"].shape == (2, grid, grid, 384)
    assert len(feats["block_pooled"]) == 12


def test_vit_position_embedding_interpolation_keeps_the_stored_grid():
    pos = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 64, 32))
    np.testing.assert_array_equal(vit_lib.resize_position_embedding(pos, 8, 8), pos)
    small = vit_lib.resize_position_embedding(pos, 4, 4)
    assert small.shape == (1, 17, 32)
    np.testing.assert_array_equal(small[:, 0], pos[:, 0])  # the CLS embedding is never interpolated
    # A constant grid stays constant under (normalised) bicubic resizing.
    flat = jnp.ones((1, 65, 32))
    np.testing.assert_allclose(vit_lib.resize_position_embedding(flat, 6, 4), jnp.ones((1, 25, 32)), atol=1e-5)


def dino_interpolate_pos_encoding(pos: np.ndarray, height: int, width: int, patch: int) -> np.ndarray:
    """DINO's ``VisionTransformer.interpolate_pos_encoding`` re-derived in PyTorch: the patch grid goes through
    ``F.interpolate(scale_factor=((h0 + 0.1) / sqrt(N), (w0 + 0.1) / sqrt(N)), mode="bicubic")``."""
    torch = pytest.importorskip("torch")
    n = int(math.sqrt(pos.shape[1] - 1))
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    grid = torch.from_numpy(pos[:, 1:].astype(np.float64)).reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=(h0 / n, w0 / n), mode="bicubic")
    assert grid.shape[-2:] == (int(h0), int(w0))
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).numpy()
    return np.concatenate([pos[:, :1], grid], axis=1)  # float64: torch's float32 weights differ by ~4e-6


@pytest.mark.parametrize("height,width", [(96, 96), (160, 160), (96, 160)])
def test_vit_position_embedding_interpolation_matches_dino(height, width):
    """At DINO's 96-px local crops, a larger 160 px and a rectangle, the interpolated embedding of a 224-px ViT-S/16
    equals DINO's (the former jax.image.resize bicubic antialiased and used a=-0.5: ~1e-2 off)."""
    pos = np.random.default_rng(0).standard_normal((1, 1 + 14 * 14, 24)).astype(np.float32)
    want = dino_interpolate_pos_encoding(pos, height, width, 16)
    got = vit_lib.resize_position_embedding(jnp.asarray(pos), height // 16, width // 16)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_drop_path_is_a_per_sample_linear_ramp():
    model = create_model("swin_test", drop_path_rate=0.3)
    x = jnp.ones((256, 32, 32, 3))
    params = model.init(jax.random.PRNGKey(0), x)
    # Recover the rates from the bound module tree: block k of 4 gets linspace(0, 0.3, 4)[k].
    _, state = model.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                           capture_intermediates=lambda m, _: isinstance(m, swin_lib.DropPath), mutable=["intermediates"])
    inter = state["intermediates"]
    rates = []
    for stage in ("layers_0", "layers_1"):
        for blk in ("blocks_0", "blocks_1"):
            outs = inter[stage][blk]["drop_path"]["__call__"]  # attention branch and MLP branch
            dropped = [float((np.abs(np.asarray(o)).reshape(256, -1).max(-1) == 0).mean()) for o in outs]
            rates.append(np.mean(dropped))
    expected = np.linspace(0, 0.3, 4)
    assert rates[0] == 0.0
    np.testing.assert_allclose(rates, expected, atol=0.09)
    # In eval mode nothing is dropped and no rng is needed.
    out_eval, _ = model.apply(params, x, train=False)
    assert np.isfinite(np.asarray(out_eval)).all()


# ------------------------------------------------------------------------------------------------
# Sharding: a jitted forward over 8 devices with the batch sharded equals the one-device forward.

@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_test", "vit_test"])
def test_sharded_forward_matches_one_device(name):
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (tests/conftest.py)"
    model = create_model(name, num_classes=3)
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    one = jax.jit(model.apply, device=None)(jax.device_put(params, jax.devices()[0]), jax.device_put(x, jax.devices()[0]))[0]
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ps = jax.device_put(params, NamedSharding(mesh, P()))
        out = jax.jit(model.apply, out_shardings=NamedSharding(mesh, P("data")))(ps, xs)[0]
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(one), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
    """bf16 matmuls, fp32 parameters and outputs: the pooled features (unit scale after the final LayerNorm) stay
    within bf16's precision of the fp32 ones, and do differ from them (the bf16 path is really taken)."""
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    m32, m16 = create_model("swin_test", num_classes=0), create_model("swin_test", num_classes=0, dtype=jnp.bfloat16)
    params = m32.init(jax.random.PRNGKey(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(m16.init(jax.random.PRNGKey(0), x)))
    out32, out16 = [np.asarray(m.apply(params, x)[1]["pooled"]) for m in (m32, m16)]
    assert out16.dtype == np.float32 and np.abs(out32).mean() > 0.1  # not collapsed to ~0
    relative = np.linalg.norm(out16 - out32) / np.linalg.norm(out32)
    assert 1e-4 < relative < 2e-2, relative


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swin_test", "vit_test"])
def test_remat_keeps_parameters_outputs_and_gradients(name):
    """``remat=True`` (memory option for 16 GB accelerators) is the same function with the same parameter tree;
    only the backward pass recomputes each block (a ``checkpoint`` in the gradient's jaxpr)."""
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    plain, remat = create_model(name, drop_path_rate=0.2), create_model(name, drop_path_rate=0.2, remat=True)
    params = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(remat.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)

    def loss(model):
        def f(p):
            out, feats = model.apply(p, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
            return jnp.sum(out ** 2) + jnp.sum(feats["tokens"] ** 2)
        return f

    (l0, g0), (l1, g1) = [jax.value_and_grad(loss(m))(params) for m in (plain, remat)]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g0))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # fp32 recomputation reorders some sums
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
    remat_jaxpr, plain_jaxpr = [str(jax.make_jaxpr(jax.grad(loss(m)))(params)) for m in (remat, plain)]
    assert re.search(r"\b(checkpoint|remat2?)\[", remat_jaxpr) and not re.search(r"\b(checkpoint|remat2?)\[", plain_jaxpr)


# ------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the rule, never an XLA shape error.

@pytest.mark.parametrize("name,make,match", [
    ("channels", lambda: create_model("swin_test").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1))), "3 input channels"),
    ("too_small", lambda: create_model("swin_test").init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3))), "smaller than"),
    ("rank", lambda: create_model("swin_test").init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3))), "NHWC"),
    ("vit_size", lambda: create_model("vit_test").init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 30, 3))), "multiple of the 4-px patch"),
    ("unknown", lambda: create_model("swin_tinyy"), "unknown model name 'swin_tinyy'"),
    ("option", lambda: create_model("swin_tiny", windw_size=7), "unknown option"),
    ("depths", lambda: create_model("swin_tiny", depths=(2, 2, 6)), "depths .* num_heads .* same length"),
    ("heads", lambda: create_model("swin_tiny", num_heads=(5, 6, 12, 24)), "not divisible by num_heads"),
])
def test_bad_input_raises_a_clear_value_error(name, make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_every_registered_model_builds():
    for name in MODEL_NAMES:
        model = create_model(name)
        size = 32 if name.endswith(("_test", "_nano")) else 224
        out, feats = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))[0])
        assert out.shape == (1, model.num_features) == feats["pooled"].shape

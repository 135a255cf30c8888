"""Augmentation ops and recipes vs NumPy/PIL re-derivations of the torchvision semantics."""
import colorsys
import dataclasses
import io
import itertools
import math

import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf
from PIL import Image, ImageOps

from swin_ssl import data
from swin_ssl.data import augment as aug

N = 4000  # samples for the statistical checks
MOBY = data.view_specs(data.default_config("moby"))
MULTICROP = data.view_specs(data.default_config("multicrop"))


def _sample(fn, n=N):
    """Runs `fn(seed)` for n different stateless seeds in one tf.data pass; returns numpy arrays."""
    base = tf.constant([7, 11], tf.int64)
    ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.random.experimental.stateless_fold_in(base, i)))
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds.batch(n))))


def _bound(p, n=N, sigmas=5.0):
    return sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9


# ------------------------------------------------------------------------------------------- sampling
def _torchvision_rrc(rng, height, width, scale, ratio):
    """NumPy re-statement of torchvision.transforms.RandomResizedCrop.get_params."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _ks(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)))


@pytest.mark.parametrize("height,width", [(427, 640), (640, 427), (17, 47)])
def test_crop_windows_follow_torchvision_sampler(height, width):
    specs = [MOBY[0], MULTICROP[0], MULTICROP[2]]  # scale (0.08, 1), (0.4, 1), (0.05, 0.4)
    windows = _sample(lambda s: aug.sample_crop_windows(s, height, width, specs))
    rng = np.random.default_rng(0)
    for v, spec in enumerate(specs):
        top, left, h, w = windows[:, v].T
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
        ref = np.array([_torchvision_rrc(rng, height, width, spec.scale, spec.ratio) for _ in range(N)])
        frac, ref_frac = h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)
        # Two-sample KS at N=4000 each: the 1e-4 critical value is ~0.043.
        assert _ks(frac, ref_frac) < 0.045, spec
        assert _ks(w / h, ref[:, 3] / ref[:, 2]) < 0.045, spec
        # Horizontal placement: the crop centre is uniform over the allowed range.
        assert _ks((left + w / 2) / width, (ref[:, 1] + ref[:, 3] / 2) / width) < 0.045, spec
        if height > 100:  # real-size image: the scale range is what the recipe says (rounding aside)
            assert frac.min() >= spec.scale[0] * 0.97 and frac.max() <= min(1.0, spec.scale[1] * 1.03)
            fits = min(width, height * spec.ratio[1]) * min(height, width / spec.ratio[0]) / (height * width)
            assert frac.min() < spec.scale[0] + 0.02 and frac.max() > min(spec.scale[1], fits) - 0.03
            assert (w / h >= 0.75 * 0.97).all() and (w / h <= 4 / 3 * 1.03).all()


@pytest.mark.parametrize("recipe,specs", [("moby", MOBY), ("multicrop", MULTICROP)])
def test_view_decision_probabilities_match_recipe(recipe, specs):
    p = _sample(lambda s: aug.sample_view_params(s, specs))
    expected = {  # per view name: flip, jitter, grey, blur, solarize (the official MoBY / EsViT recipes)
        "view1": (0.5, 0.8, 0.2, 1.0, 0.0), "view2": (0.5, 0.8, 0.2, 0.1, 0.2),
        "global0": (0.5, 0.8, 0.2, 1.0, 0.0), "global1": (0.5, 0.8, 0.2, 0.1, 0.2),
    }
    for v, spec in enumerate(specs):
        want = expected.get(spec.name, (0.5, 0.8, 0.2, 0.5, 0.0))  # locals
        for key, prob in zip(("flip", "jitter", "grayscale", "blur", "solarize"), want):
            freq = p[key][:, v].mean()
            if prob in (0.0, 1.0):
                assert freq == prob, (spec.name, key, freq)
            else:
                assert abs(freq - prob) < _bound(prob), (spec.name, key, freq, prob)
        for key, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                            ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)):
            x = p[key][:, v]
            assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6, (spec.name, key)
            # Uniform on [lo, hi]: mean and the fraction in the lower quarter.
            assert abs(x.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * N), (spec.name, key)
            assert abs((x < lo + (hi - lo) / 4).mean() - 0.25) < _bound(0.25), (spec.name, key)
    # Jitter order: a permutation, all 24 equally likely.
    orders = p["jitter_order"].reshape(-1, 4)
    assert (np.sort(orders, axis=1) == np.arange(4)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in orders:
        counts[tuple(row)] += 1
    for c in counts.values():
        assert abs(c / len(orders) - 1 / 24) < _bound(1 / 24, len(orders))
    # Views decide independently: blur of view 0 and view 1 uncorrelated (when both random).
    if recipe == "multicrop":
        both = (p["blur"][:, 2] & p["blur"][:, 3]).mean()
        assert abs(both - 0.25) < _bound(0.25)


# ------------------------------------------------------------------------------------- photometric ops
def _np_grey(x):
    return x[..., 0:1] * 0.299 + x[..., 1:2] * 0.587 + x[..., 2:3] * 0.114


def _np_op(x, name, f):
    """torchvision's ColorJitter ops on float [0, 1] images (blend formulas of its functional API)."""
    if name == "brightness":
        return np.clip(x * f, 0, 1)
    if name == "contrast":
        return np.clip(f * x + (1 - f) * _np_grey(x).mean(), 0, 1)
    if name == "saturation":
        return np.clip(f * x + (1 - f) * _np_grey(x), 0, 1)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*x[idx])
        out[idx] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
    return out


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(0).uniform(0, 1, (12, 10, 3)).astype(np.float32)


@pytest.mark.parametrize("name,fn,f", [("brightness", aug.adjust_brightness, 1.3),
                                       ("contrast", aug.adjust_contrast, 0.7),
                                       ("saturation", aug.adjust_saturation, 1.2),
                                       ("hue", aug.adjust_hue, -0.08)])
def test_jitter_ops_match_torchvision_formulas(rgb, name, fn, f):
    np.testing.assert_allclose(fn(tf.constant(rgb), tf.constant(f)).numpy(), _np_op(rgb, name, f), atol=2e-5)


def test_color_jitter_applies_ops_in_sampled_order(rgb):
    factors = {"brightness": 1.3, "contrast": 0.65, "saturation": 1.15, "hue": 0.07}
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 3, 0, 1]):
        params = {k: tf.constant(v) for k, v in factors.items()}
        params["jitter_order"] = tf.constant(order, tf.int32)
        expected = rgb
        for k in order:
            name = aug.JITTER_OPS[k]
            expected = _np_op(expected, name, factors[name])
        np.testing.assert_allclose(aug.color_jitter(tf.constant(rgb), params).numpy(), expected, atol=3e-5)


def test_grayscale_solarize_blur_match_pil_and_scipy(rgb):
    u8 = (rgb * 255).round().astype(np.uint8)
    x = tf.constant(u8.astype(np.float32) / 255)
    pil_grey = np.asarray(Image.fromarray(u8).convert("L"), np.float32) / 255
    np.testing.assert_allclose(aug.grayscale(x).numpy(), np.repeat(pil_grey[..., None], 3, -1), atol=0.6 / 255)
    pil_sol = np.asarray(ImageOps.solarize(Image.fromarray(u8), 128), np.float32) / 255
    np.testing.assert_allclose(aug.solarize(x, 128).numpy(), pil_sol, atol=1e-6)
    for sigma in (0.3, 1.0, 1.9):
        radius = 6
        want = scipy.ndimage.gaussian_filter(u8.astype(np.float64) / 255, sigma=(sigma, sigma, 0),
                                             mode="reflect", truncate=radius / sigma)
        got = aug.gaussian_blur(x, tf.constant(sigma), radius).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------- whole views
def _jpeg(array, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    yy, xx = np.mgrid[0:120, 0:180]
    img = np.stack([xx * 255 / 180, yy * 255 / 120, 128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 7.0)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _denorm(x, spec):
    return x * np.asarray(spec.std) + np.asarray(spec.mean)


def test_views_crop_resize_like_pil(photo):
    """With photometric ops off, a view is PIL's crop(window).resize(size) of the decoded image.

    PIL filters when it shrinks (antialias); within uint8 rounding, so do we.
    """
    encoded = tf.constant(_jpeg(photo))
    decoded = tf.io.decode_jpeg(encoded, channels=3).numpy()
    for interp, pil_interp in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        spec = aug.ViewSpec("v", 32, (0.08, 1.0), interpolation=interp, flip_prob=0.0, color_jitter_prob=0.0,
                            grayscale_prob=0.0)
        for i in range(3):
            views, params = aug.make_views(encoded, tf.constant([i, 3], tf.int64), [spec], return_params=True)
            top, left, h, w = params["v"]["crop"].numpy()
            ref = Image.fromarray(decoded).crop((left, top, left + w, top + h)).resize((32, 32), pil_interp)
            got = _denorm(views["v"].numpy(), spec)
            diff = np.abs(got - np.asarray(ref, np.float32) / 255)
            assert diff.mean() < 0.003 and diff.max() < 0.015, (interp, diff.mean(), diff.max())


def test_fused_jpeg_crop_decode_equals_full_decode(photo):
    """Decoding only the union of the windows gives the same views as decoding the whole JPEG first."""
    noisy = np.clip(photo + np.random.default_rng(1).normal(0, 25, photo.shape), 0, 255).astype(np.uint8)
    for kw in ({}, {"progressive": True}):
        encoded = tf.constant(_jpeg(noisy, **kw))
        decoded = tf.io.decode_jpeg(encoded, channels=3)
        for i in range(4):
            seed = tf.constant([i, 1], tf.int64)
            fused, full = aug.make_views(encoded, seed, MOBY), aug.make_views(decoded, seed, MOBY)
            for name in fused:
                np.testing.assert_array_equal(fused[name].numpy(), full[name].numpy())


def test_views_apply_the_sampled_decisions(photo):
    """Switching one op's probability to 1 changes the view exactly by that op (same seed, same crop)."""
    encoded = tf.constant(_jpeg(photo))
    off = dict(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)
    seed = tf.constant([5, 9], tf.int64)
    base_spec = aug.ViewSpec("v", 24, **off)
    base = _denorm(aug.make_views(encoded, seed, [base_spec])["v"].numpy(), base_spec)

    def with_op(**kw):
        spec = aug.ViewSpec("v", 24, **dict(off, **kw))
        views, params = aug.make_views(encoded, seed, [spec], return_params=True)
        return _denorm(views["v"].numpy(), spec), {k: v.numpy() for k, v in params["v"].items()}

    flipped, p = with_op(flip_prob=1.0)
    assert p["flip"] and np.allclose(flipped, base[:, ::-1], atol=1e-5)
    grey, p = with_op(grayscale_prob=1.0)
    assert p["grayscale"] and np.allclose(grey, np.repeat(_np_grey(base), 3, -1), atol=1e-5)
    sol, p = with_op(solarize_prob=1.0)
    assert p["solarize"] and np.allclose(sol, np.where(base >= 128 / 255, 1 - base, base), atol=1e-5)
    blurred, p = with_op(blur_prob=1.0)
    radius = aug.blur_radius(aug.ViewSpec("v", 24))
    want = scipy.ndimage.gaussian_filter(base.astype(np.float64), sigma=(p["sigma"], p["sigma"], 0),
                                         mode="reflect", truncate=radius / p["sigma"])
    assert p["blur"] and np.allclose(blurred, want, atol=1e-5)
    jittered, p = with_op(color_jitter_prob=1.0)
    want = base
    for k in p["jitter_order"]:
        name = aug.JITTER_OPS[k]
        want = _np_op(want, name, p[name])
    assert p["jitter"] and np.allclose(jittered, want, atol=1e-4)


def test_eval_view_is_resize_then_centre_crop(photo):
    """torchvision Resize(round(32/0.875)=37) on the shorter side, then CenterCrop(32)."""
    u8 = photo[:, :150]  # 120 x 150
    got = _denorm(aug.eval_view(tf.constant(u8), 32, 0.875, "bilinear").numpy(), aug.ViewSpec("v", 32))
    resized = Image.fromarray(u8).resize((int(37 * 150 / 120), 37), Image.BILINEAR)  # (46, 37)
    top, left = int(round((37 - 32) / 2)), int(round((46 - 32) / 2))
    ref = np.asarray(resized, np.float32)[top:top + 32, left:left + 32] / 255
    diff = np.abs(got - ref)
    assert got.shape == (32, 32, 3) and diff.mean() < 0.003 and diff.max() < 0.01


def test_decoding_grey_cmyk_png_and_tiny_images(photo):
    red = np.zeros((40, 60, 3), np.uint8)
    red[..., 0] = 220
    cmyk = io.BytesIO()
    Image.fromarray(red).convert("CMYK").save(cmyk, "JPEG", quality=95)
    png = io.BytesIO()
    Image.fromarray(red).save(png, "PNG")
    spec = aug.ViewSpec("v", 16, (1.0, 1.0), (1.5, 1.5), flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0)
    for encoded in (cmyk.getvalue(), png.getvalue()):
        view = _denorm(aug.make_views(tf.constant(encoded), tf.constant([1, 2], tf.int64), [spec])["v"].numpy(), spec)
        np.testing.assert_allclose(view.reshape(-1, 3).mean(0), [220 / 255, 0, 0], atol=0.02)
    grey = _jpeg(photo[..., 0])
    view = _denorm(aug.make_views(tf.constant(grey), tf.constant([1, 2], tf.int64), [spec])["v"].numpy(), spec)
    assert np.allclose(view[..., 0], view[..., 1], atol=1e-5) and np.allclose(view[..., 1], view[..., 2], atol=1e-5)
    # A 6x3 image: every view still has its full size (crops upscale).
    tiny = tf.constant(_jpeg(photo[:6, :3]))
    views = aug.make_views(tiny, tf.constant([1, 2], tf.int64), MULTICROP[:3])
    assert [tuple(views[s.name].shape) for s in MULTICROP[:3]] == [(224, 224, 3), (224, 224, 3), (96, 96, 3)]


# ------------------------------------------------------------------------------- fast paths vs references
def _photos():
    """Real photos shipped by scikit-learn / scikit-image (offline), as uint8 RGB arrays."""
    sklearn = pytest.importorskip("sklearn")
    skimage = pytest.importorskip("skimage")
    import os
    paths = [os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", f"{n}.jpg") for n in ("china", "flower")]
    paths += [os.path.join(os.path.dirname(skimage.__file__), "data", f"{n}.jpg") for n in ("rocket", "hubble_deep_field")]
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths if os.path.isfile(p)]
    if not photos:
        pytest.skip("no sample photos installed")
    return photos


@pytest.mark.parametrize("interp,pil_interp", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_resize_like_pil_matches_pil_and_tf_antialias_on_photos(interp, pil_interp):
    """The banded-GEMM resize against PIL and against tf.image.resize(antialias=True), which it replaces.

    Crops of real photos, shrunk (up to ~6x) and enlarged, to the recipe sizes. Against PIL: mean absolute
    difference < 0.4 grey levels per image (PIL rounds to uint8: ~0.25 from rounding alone), 99.9th
    percentile < 2.5 levels; bilinear at most 1 level anywhere, bicubic < 10 (PIL clips its overshoot
    between the two passes; TF does not). Against TF's antialiased resize: equal within 0.01 levels.
    """
    rng = np.random.default_rng(0)
    for photo in _photos():
        height, width = photo.shape[:2]
        for size in (224, 96, 32):
            for _ in range(3):
                h, w = int(rng.integers(6, height + 1)), int(rng.integers(6, width + 1))
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                crop = photo[top:top + h, left:left + w]
                got = np.clip(aug.resize_like_pil(tf.constant(crop), size, interp).numpy(), 0, 255)
                pil = np.asarray(Image.fromarray(crop).resize((size, size), pil_interp), np.float32)
                diff = np.abs(got - pil)
                case = (interp, size, crop.shape, diff.mean(), np.percentile(diff, 99.9), diff.max())
                assert diff.mean() < 0.4 and np.percentile(diff, 99.9) < 2.5, case
                assert diff.max() <= (1.0 + 1e-3 if interp == "bilinear" else 10.0), case
                ref = tf.image.resize(crop, [size, size], method=interp, antialias=True).numpy()
                np.testing.assert_allclose(aug.resize_like_pil(tf.constant(crop), size, interp).numpy(), ref,
                                           atol=0.01, err_msg=str(case))


def test_resize_plan_gain_and_views_of_a_group_share_one_plan():
    """`resample_plan` for several input sizes at once equals the per-size plans; `gain` scales the weights."""
    sizes = tf.constant([5, 96, 223, 640])
    rows, weights = aug.resample_plan(sizes, 96, "bicubic", gain=2.0)
    for v, n in enumerate(sizes.numpy()):
        r1, w1 = aug.resample_plan(tf.constant([n]), 96, "bicubic")
        length = r1.shape[-1]
        np.testing.assert_allclose(weights[v, :, :, :length].numpy(), 2 * w1[0].numpy(), atol=1e-6)
        assert np.all(weights[v, :, :, length:].numpy() == 0)
        np.testing.assert_allclose(weights[v].numpy().sum(-1).reshape(-1)[:96], 2.0, atol=1e-5)
        assert rows[v].numpy().max() <= n - 1 and rows[v].numpy().min() >= 0


def test_jit_compiled_photometric_ops_equal_plain_tf_ops(monkeypatch):
    """The XLA-compiled photometric function gives the plain TF ops' views (ops forced on, off, at random)."""
    photo = _photos()[0]
    encoded = tf.constant(_jpeg(photo[:200, :300]))
    specs = [dataclasses.replace(s, flip_prob=p, color_jitter_prob=p, grayscale_prob=q, blur_prob=p, solarize_prob=p)
             for s in MULTICROP[1:3] for p, q in ((1.0, 0.0), (1.0, 1.0), (0.5, 0.2))]
    specs = [dataclasses.replace(s, name=f"v{i}") for i, s in enumerate(specs)]
    for i in range(3):
        seed = tf.constant([i, 4], tf.int64)
        monkeypatch.setattr(aug, "JIT_PHOTOMETRIC", True)
        jit = aug.make_views(encoded, seed, specs)
        monkeypatch.setattr(aug, "JIT_PHOTOMETRIC", False)
        plain = aug.make_views(encoded, seed, specs)
        for name in jit:
            diff = np.abs(jit[name].numpy() - plain[name].numpy())
            # Float rounding (XLA fuses and reorders; 1e-4 here is 0.006 grey levels), except where a
            # discontinuous op (solarize's threshold, hue at a tie of two channels) turns a 1e-7
            # difference into a visible one: a few pixels in a thousand at most.
            assert (diff > 1e-4).mean() < 1e-3 and diff.mean() < 3e-5, (name, (diff > 1e-4).sum(), diff.max())

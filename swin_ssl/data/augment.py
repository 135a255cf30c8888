"""Augmentations as TF ops: random-resized crops, colour jitter, grayscale, blur, solarize, eval crops.

Why TF ops: they run inside tf.data on the host, in parallel, without the GIL, and TensorFlow never takes
the accelerator. Every random decision comes from a *stateless* RNG keyed by a per-example seed, so a batch
is a pure function of `(seed, example position)` and a resumed run sees exactly the same views.

The recipes follow the official PyTorch code (torchvision on PIL images), op by op and in the same order:
crop+resize -> horizontal flip -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p) -> solarize (p)
-> ImageNet mean/std. Where PIL/torchvision semantics are followed and where they are not:

* RandomResizedCrop: torchvision's sampler exactly (10 attempts of area ~ U(scale) * H * W and
  log-aspect ~ U(log ratio), w/h rounded, first attempt that fits; else a centre crop clamped to the ratio).
  The crop is resized with PIL's filter coefficients (`resize_like_pil`: like PIL, it low-pass filters
  when it shrinks; bicubic is Keys' a=-0.5 kernel as in PIL), computed as banded matrix products; it
  equals `tf.image.resize(antialias=True)` within float rounding and is 2-3x faster (other
  interpolations, and `antialias=False`, use `tf.image.resize`).
* ColorJitter(b, c, s, h): torchvision's semantics, not tf.image's: factors b ~ U[1-b, 1+b],
  c ~ U[1-c, 1+c], s ~ U[1-s, 1+s], hue ~ U[-h, h], applied in a uniformly random order of the four ops
  (torchvision draws `randperm(4)`), each followed by a clip to [0, 1]. Brightness multiplies (blend with
  black); contrast blends with the mean of the grey image (a scalar); saturation blends with the grey
  image; hue rotates the HSV hue by `hue` turns (`tf.image.adjust_hue`). Grey = 0.299 R + 0.587 G + 0.114 B
  (PIL's "L"). Unlike PIL we keep float32 between ops instead of rounding to uint8 after each op.
* Gaussian blur: a separable Gaussian with std sigma ~ U(blur_sigma) pixels (PIL's `GaussianBlur(radius)`
  takes the std too; PIL approximates it with box filters), support ceil(3 * max sigma), edges mirrored.
* Speed: everything after the resize (clip, flip, jitter, grayscale, blur, solarize, normalise) runs for
  all the views of one size as one XLA-compiled call (`JIT_PHOTOMETRIC`), compiled once per process.
* Solarize: PIL's `ImageOps.solarize(threshold=128)` on the uint8 scale: x >= 128/255 -> 1 - x.
* Eval: torchvision's Resize(round(size / crop_pct)) on the shorter side (longer side truncated as
  torchvision does) then CenterCrop(size) with its rounding.

Decoding: a JPEG is decoded once per example for all its views: the crop windows are sampled from the
header (`tf.image.extract_jpeg_shape`) and only the union of the windows (plus a 16 px margin, so that
libjpeg's chroma upsampling at the crop edge never reaches a view: the views equal those of a full
decode, bit for bit) is decoded with the fused `tf.io.decode_and_crop_jpeg`. Anything else (PNG named .JPEG, GIF, BMP, and 16-bit PNG) goes through
`tf.io.decode_image(channels=3, expand_animations=False)`. Both paths give RGB for grey and CMYK input.
Before either, `check_budget` reads the image size from the header (`header_shape`: JPEG, PNG, GIF, BMP, WebP)
and refuses files over `max_bytes` or images over `max_pixels` (default: PIL's decompression-bomb limit), so a
small file declaring a huge image is never decoded. Corrupt, unknown or over-budget data raises
InvalidArgumentError; the pipeline replaces such examples and names them (see `pipeline.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from swin_ssl.data.defaults import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from swin_ssl.normalization import IMAGENET_MEAN, IMAGENET_STD

_GREY_WEIGHTS = (0.299, 0.587, 0.114)
_METHODS = {
    "bilinear": tf.image.ResizeMethod.BILINEAR,
    "bicubic": tf.image.ResizeMethod.BICUBIC,
    "nearest": tf.image.ResizeMethod.NEAREST_NEIGHBOR,
    "area": tf.image.ResizeMethod.AREA,
    "lanczos3": tf.image.ResizeMethod.LANCZOS3,
}
_JPEG_MARGIN = 16
# Order of the colour-jitter ops; `jitter_order` holds a permutation of these indices.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
    """How one named view is made from an image (all sizes in pixels, probabilities in [0, 1])."""
    name: str
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"
    antialias: bool = True
    flip_prob: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: float = 128.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.interpolation not in _METHODS:
            raise ValueError(f"view {self.name}: interpolation {self.interpolation!r} not in {sorted(_METHODS)}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"view {self.name}: crop scale {self.scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"view {self.name}: crop ratio {self.ratio} must satisfy 0 < lo <= hi")
        if self.size < 1:
            raise ValueError(f"view {self.name}: size {self.size} must be positive")


# ----------------------------------------------------------------------------------------------- sampling
def _per_view(specs: Sequence[ViewSpec], fn) -> tf.Tensor:
    return tf.constant([fn(spec) for spec in specs], tf.float32)


def sample_crop_windows(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, specs: Sequence[ViewSpec],
                        attempts: int = 10) -> tf.Tensor:
    """torchvision's RandomResizedCrop sampler for every view at once: int32 [V, 4] rows `[top, left, h, w]`.

    Per view: `attempts` tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio), w and h rounded
    (half to even, like Python's `round`); the first try that fits is placed uniformly; if none fits, the
    centre crop of the whole image clamped to the ratio range.
    """
    h_img = tf.cast(height, tf.float32)
    w_img = tf.cast(width, tf.float32)
    scale_lo, scale_hi = _per_view(specs, lambda s: s.scale[0]), _per_view(specs, lambda s: s.scale[1])
    ratio_lo, ratio_hi = _per_view(specs, lambda s: s.ratio[0]), _per_view(specs, lambda s: s.ratio[1])
    u = tf.random.stateless_uniform([len(specs), attempts, 4], seed)
    target_area = h_img * w_img * (scale_lo[:, None] + (scale_hi - scale_lo)[:, None] * u[..., 0])
    log_lo, log_hi = tf.math.log(ratio_lo)[:, None], tf.math.log(ratio_hi)[:, None]
    aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = tf.round(tf.sqrt(target_area * aspect))
    h = tf.round(tf.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    k = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    pick = lambda t: tf.gather(t, k, batch_dims=1)  # noqa: E731
    h_k, w_k = pick(h), pick(w)
    top = tf.floor(pick(u[..., 2]) * (h_img - h_k + 1))
    left = tf.floor(pick(u[..., 3]) * (w_img - w_k + 1))
    sampled = tf.stack([top, left, h_k, w_k], axis=1)
    in_ratio = w_img / h_img
    fb_w = tf.where(in_ratio > ratio_hi, tf.round(h_img * ratio_hi), w_img)
    fb_h = tf.where(in_ratio < ratio_lo, tf.round(w_img / ratio_lo), h_img)
    fb_w, fb_h = tf.clip_by_value(fb_w, 1, w_img), tf.clip_by_value(fb_h, 1, h_img)
    fallback = tf.stack([tf.floor((h_img - fb_h) / 2), tf.floor((w_img - fb_w) / 2), fb_h, fb_w], axis=1)
    return tf.cast(tf.where(tf.reduce_any(fits, axis=1)[:, None], sampled, fallback), tf.int32)


def sample_view_params(seed: tf.Tensor, specs: Sequence[ViewSpec]) -> dict[str, tf.Tensor]:
    """Every photometric decision of every view: a dict of [V] tensors (`jitter_order`: [V, 4]).

    Jitter factors follow torchvision: brightness/contrast/saturation ~ U[max(0, 1 - s), 1 + s], hue ~
    U[-h, h], order = a uniform random permutation of `JITTER_OPS`. Factors are drawn even when the
    jitter is not applied (as torchvision does); they are then simply unused.
    """
    u = tf.random.stateless_uniform([len(specs), 14], seed)

    def factor(x, k):
        strength = _per_view(specs, lambda s: s.color_jitter[k])
        lo = tf.maximum(0.0, 1.0 - strength)
        return lo + (1.0 + strength - lo) * x

    sigma_lo, sigma_hi = _per_view(specs, lambda s: s.blur_sigma[0]), _per_view(specs, lambda s: s.blur_sigma[1])
    return {
        "flip": u[:, 0] < _per_view(specs, lambda s: s.flip_prob),
        "jitter": u[:, 1] < _per_view(specs, lambda s: s.color_jitter_prob),
        "brightness": factor(u[:, 2], 0),
        "contrast": factor(u[:, 3], 1),
        "saturation": factor(u[:, 4], 2),
        "hue": _per_view(specs, lambda s: s.color_jitter[3]) * (2.0 * u[:, 5] - 1.0),
        "jitter_order": tf.cast(tf.argsort(u[:, 6:10], axis=1), tf.int32),
        "grayscale": u[:, 10] < _per_view(specs, lambda s: s.grayscale_prob),
        "blur": u[:, 11] < _per_view(specs, lambda s: s.blur_prob),
        "sigma": sigma_lo + (sigma_hi - sigma_lo) * u[:, 12],
        "solarize": u[:, 13] < _per_view(specs, lambda s: s.solarize_prob),
    }


# ------------------------------------------------------------------------------------------ photometric ops
# Channel-broadcast ops against a [3] vector are slow in TF on CPU; these stick to scalar or same-shape ops.
def to_grey(image: tf.Tensor) -> tf.Tensor:
    """[H, W, 3] -> [H, W, 1] with PIL's "L" weights."""
    r, g, b = _GREY_WEIGHTS
    return image[..., 0:1] * r + image[..., 1:2] * g + image[..., 2:3] * b


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    mean = tf.reduce_sum(tf.reduce_mean(image, axis=[0, 1]) * tf.constant(_GREY_WEIGHTS, image.dtype))
    return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(factor * image + (1.0 - factor) * to_grey(image), 0.0, 1.0)


def adjust_hue(image: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(image: tf.Tensor, params: dict[str, tf.Tensor]) -> tf.Tensor:
    """torchvision ColorJitter on a float [0, 1] image with the sampled factors, in the sampled order."""
    ops = [lambda x: adjust_brightness(x, params["brightness"]),
           lambda x: adjust_contrast(x, params["contrast"]),
           lambda x: adjust_saturation(x, params["saturation"]),
           lambda x: adjust_hue(x, params["hue"])]

    def step(k, x):  # one switch in a loop: XLA compiles each op once, not once per position (12 s -> 1.5 s)
        return k + 1, tf.switch_case(params["jitter_order"][k], [lambda f=f: f(x) for f in ops])
    _, image = tf.while_loop(lambda k, x: k < 4, step, (tf.constant(0), image), maximum_iterations=4)
    return image


def grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.tile(to_grey(image), [1, 1, 3])


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur of an [H, W, C] image; `radius` (static) is the half-width of the kernel.

    Written as sums of shifted slices (no convolution op): XLA fuses each pass into one loop, where its
    depthwise convolution is ~40x slower on CPU.
    """
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel = kernel / tf.reduce_sum(kernel)
    taps = tf.unstack(kernel)
    height, width = image.shape[0], image.shape[1]
    padded = tf.pad(image, [[radius, radius], [0, 0], [0, 0]], mode="SYMMETRIC")
    out = tf.add_n([taps[i] * padded[i:i + height] for i in range(2 * radius + 1)])
    padded = tf.pad(out, [[0, 0], [radius, radius], [0, 0]], mode="SYMMETRIC")
    return tf.add_n([taps[i] * padded[:, i:i + width] for i in range(2 * radius + 1)])


def solarize(image: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
    """PIL's ImageOps.solarize on the uint8 scale: x >= threshold/255 -> 1 - x."""
    above = tf.cast(image >= threshold / 255.0, image.dtype)
    return image + above * (1.0 - 2.0 * image)


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(x - mean) / std, as one multiply-add with same-shape constants when the shape is static."""
    shape = image.shape
    if shape.is_fully_defined():
        scale = tf.constant(np.broadcast_to(1.0 / np.asarray(std, np.float32), shape))
        offset = tf.constant(np.broadcast_to(-np.asarray(mean, np.float32) / np.asarray(std, np.float32), shape))
        return image * scale + offset
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# ------------------------------------------------------------------------------------------------ resizing
# PIL's filters (Pillow `Resample.c`): support in input pixels at scale 1, and the kernel.
_PIL_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
_RESIZE_BLOCK = 8  # outputs per dense block of the banded resample (8-16 measured fastest on CPU)


def _pil_filter(x: tf.Tensor, method: str) -> tf.Tensor:
    x = tf.abs(x)
    if method == "bilinear":
        return tf.maximum(1.0 - x, 0.0)
    a = -0.5  # PIL's bicubic (Keys, a = -0.5)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def resample_plan(in_sizes: tf.Tensor, size: int, method: str, gain: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """PIL's 1-D resampling of `in_sizes[v]` samples to `size`, for V inputs at once, as banded blocks.

    Output i of input v is `sum_j w_ij x_j` with PIL's coefficients (Pillow `precompute_coeffs`): centre
    c_i = (i + 0.5) * n / size, kernel stretched by f = max(n / size, 1) (the low-pass filter when shrinking),
    w_ij = filter((j - c_i + 0.5) / f) over the taps inside the image, normalised to sum 1 (times `gain`).
    The band is cut into blocks of `_RESIZE_BLOCK` outputs; block b reads inputs `rows[v, b, :]` (L of
    them, clipped to the image; the weights of clipped duplicates are 0). Returns `(rows int32 [V, nb, L],
    weights float32 [V, nb, block, L])`; `apply_plan` then needs one gather and one batched GEMM.
    """
    n = tf.cast(tf.reshape(in_sizes, [-1]), tf.int32)
    block = _RESIZE_BLOCK
    num_blocks = -(-size // block)
    n_f = tf.cast(n, tf.float64)[:, None]                                      # [V, 1]
    scale = n_f / size
    filter_scale = tf.maximum(scale, 1.0)
    support = _PIL_SUPPORT[method] * filter_scale
    out = tf.range(num_blocks * block)
    center = (tf.cast(out, tf.float64)[None] + 0.5) * scale                 # [V, nb * block]
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)          # C's (int) truncation, as PIL
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), n[:, None])
    xmax = tf.where(out[None] < size, xmax, 0)                               # padding outputs read nothing
    starts = xmin[:, ::block]                                                # xmin is non-decreasing
    ends = tf.reduce_max(tf.reshape(xmax, [-1, num_blocks, block]), axis=2)
    # Inputs read per block, rounded up to a multiple of 8: few distinct GEMM shapes (oneDNN builds a kernel
    # per new shape, which costs more than a small product).
    length = (tf.reduce_max(ends - starts) + 7) // 8 * 8
    taps = starts[:, :, None] + tf.range(length)[None, None]                 # [V, nb, L]
    offset = tf.cast(taps, tf.float64)[:, :, None] - tf.reshape(center, [-1, num_blocks, block, 1]) + 0.5
    w = _pil_filter(tf.cast(offset / filter_scale[:, :, None, None], tf.float32), method)
    # Outside [xmin, xmax) the filter is 0 already, except past the image end and for padding outputs.
    inside = (taps[:, :, None] < tf.reshape(xmax, [-1, num_blocks, block, 1]))
    w = tf.where(inside, w, tf.zeros_like(w))
    total = tf.reduce_sum(w, axis=3, keepdims=True)
    w = w * (gain / tf.where(total == 0.0, tf.ones_like(total), total))
    return tf.minimum(taps, n[:, None, None] - 1), w


def apply_plan(x: tf.Tensor, rows: tf.Tensor, weights: tf.Tensor, size: int) -> tf.Tensor:
    """Resamples the leading axis of `x` ([n, m], uint8 or float) with one view's plan: float32 [size, m]."""
    gathered = tf.cast(tf.gather(x, rows), tf.float32)                       # [nb, L, m]
    out = tf.matmul(weights, gathered)                                       # [nb, block, m]
    return tf.reshape(out, [-1, tf.shape(x)[1]])[:size]


def resize_planned(image: tf.Tensor, size: int, method: str, plan_h, plan_w, transposed: bool = False) -> tf.Tensor:
    """`resize_like_pil` with precomputed plans (`plan_h` for the H input rows, `plan_w` for the W columns).

    With `transposed`, returns the [size_w, size_h, 3] transpose (the caller transposes later, fused).
    """
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    w_pad = (w + 15) // 16 * 16  # few distinct GEMM shapes, as in `resample_plan`
    x = tf.pad(image, [[0, 0], [0, w_pad - w], [0, 0]])
    x = apply_plan(tf.reshape(x, [h, w_pad * 3]), *plan_h, size)             # [size_h, W_pad * 3]
    x = tf.reshape(tf.transpose(tf.reshape(x, [size, w_pad, 3])[:, :w], [1, 0, 2]), [w, size * 3])
    out = tf.reshape(apply_plan(x, *plan_w, size), [size, size, 3])         # [size_w, size_h, 3]
    return out if transposed else tf.transpose(out, [1, 0, 2])


def resize_like_pil(image: tf.Tensor, size: int, method: str = "bilinear", gain: float = 1.0) -> tf.Tensor:
    """PIL's `Image.resize((size, size), BILINEAR | BICUBIC)` of a uint8 [H, W, 3] image, in float32 * gain.

    Separable like PIL, with PIL's coefficients (antialiased when shrinking, plain interpolation when
    enlarging; see `resample_plan`): the same filter as `tf.image.resize(antialias=True)`, whose output it
    equals within float rounding, 2-3x faster on CPU. Vertical pass first (no transpose of the input;
    PIL goes horizontal first), in float32: unlike PIL, nothing is rounded to uint8 and the bicubic
    overshoot of the first pass is not clipped (the caller clips the output). On photos this is within
    0.3 grey levels of PIL on average (PIL's rounding); with bicubic, single pixels at hard edges differ
    by up to ~7 levels (PIL clips between its passes; so does neither this nor tf.image.resize). Measured
    on photos in tests/test_data_augment.py.
    """
    if method not in _PIL_SUPPORT:
        raise ValueError(f"resize_like_pil supports {sorted(_PIL_SUPPORT)}, got {method!r}")
    shape = tf.shape(image)
    rows_h, w_h = resample_plan(shape[0], size, method)
    rows_w, w_w = resample_plan(shape[1], size, method, gain)
    return resize_planned(image, size, method, (rows_h[0], w_h[0]), (rows_w[0], w_w[0]))


def blur_radius(spec: ViewSpec) -> int:
    return max(1, min(int(math.ceil(3.0 * spec.blur_sigma[1])), spec.size - 1))


def _group_key(spec: ViewSpec) -> tuple:
    """Views that share a key are made by one traced function (their probabilities may differ)."""
    return (spec.size, spec.interpolation, spec.antialias, tuple(spec.mean), tuple(spec.std),
            spec.solarize_threshold)


def _pil_resized(spec: ViewSpec) -> bool:
    """Views resized by `resize_like_pil` (PIL's filter); the others by `tf.image.resize`."""
    return spec.antialias and spec.interpolation in _PIL_SUPPORT


def resize_plans(windows: tf.Tensor, spec: ViewSpec) -> tuple[tf.Tensor, ...]:
    """`resample_plan`s of the crops `windows` ([V, 4]) for views like `spec`: (rows_h, w_h, rows_w, w_w)."""
    rows_h, w_h = resample_plan(windows[:, 2], spec.size, spec.interpolation)
    rows_w, w_w = resample_plan(windows[:, 3], spec.size, spec.interpolation, gain=1.0 / 255.0)
    return rows_h, w_h, rows_w, w_w


def resize_view(region: tf.Tensor, window: tf.Tensor, spec: ViewSpec,
                plan: Sequence[tf.Tensor] | None = None) -> tuple[tf.Tensor, bool]:
    """Crops `window` ([top, left, h, w]) out of the uint8 `region` and resizes it: float [size, size, 3] in
    [0, 1] (bicubic may overshoot), and whether it is transposed (PIL-filter path: `photometric` undoes it).

    `plan` is this view's `resize_plans` entry (computed here when not given).
    """
    crop = region[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
    if _pil_resized(spec):
        if plan is None:
            plan = [p[0] for p in resize_plans(window[None], spec)]
        image = resize_planned(crop, spec.size, spec.interpolation, plan[:2], plan[2:], transposed=True)
        transposed = True
    else:
        image = tf.image.resize(crop, [spec.size, spec.size], method=_METHODS[spec.interpolation],
                                antialias=spec.antialias) * (1.0 / 255.0)
        transposed = False
    image.set_shape([spec.size, spec.size, 3])
    return image, transposed


def apply_view(region: tf.Tensor, window: tf.Tensor, params: dict[str, tf.Tensor], spec: ViewSpec,
               ops: Sequence[str] = ("flip", "jitter", "grayscale", "blur", "solarize")) -> tf.Tensor:
    """Crop `window` ([top, left, h, w] in `region`) out of a uint8 image, resize, apply the sampled ops.

    `params` holds one view's scalars from `sample_view_params`; `ops` lists the ops whose decision is
    looked at (a group of views includes an op when any of them may apply it).
    """
    image, transposed = resize_view(region, window, spec)
    return photometric_views(image[None], {k: params[k][None] for k in PHOTOMETRIC_PARAMS}, spec, ops,
                             transposed)[0]


# The photometric ops of a group of views run as one XLA-compiled function (static [V, size, size, 3]
# shape; compiled once per view kind and process, ~1-2 s): XLA fuses the chains of element-wise ops, the
# blur's shifted sums and the transpose left by the resize into a few loops, ~2x faster than TF's
# op-by-op kernels on CPU. False: plain TF ops (the same results within float rounding;
# tests/test_data_augment.py compares the two).
JIT_PHOTOMETRIC = True
PHOTOMETRIC_PARAMS = ("flip", "jitter", "brightness", "contrast", "saturation", "hue", "jitter_order",
                      "grayscale", "blur", "sigma", "solarize")


def photometric_views(images: tf.Tensor, params: dict[str, tf.Tensor], spec: ViewSpec,
                      ops: Sequence[str] = ("flip", "jitter", "grayscale", "blur", "solarize"),
                      transposed: bool = False) -> tf.Tensor:
    """`photometric` of each of the [V, size, size, 3] `images` with its [V] `params`, in one call."""
    params = {k: params[k] for k in PHOTOMETRIC_PARAMS}
    if JIT_PHOTOMETRIC:
        return _photometric_views_jit(spec, tuple(ops), transposed)(images, params)
    return _photometric_views(images, params, spec, tuple(ops), transposed)


def _photometric_views(images, params, spec, ops, transposed):
    return tf.map_fn(lambda e: photometric(e[0], e[1], spec, ops, transposed), (images, params),
                     fn_output_signature=tf.TensorSpec([spec.size, spec.size, 3], tf.float32))


@functools.lru_cache(maxsize=None)
def _photometric_views_jit(spec: ViewSpec, ops: tuple[str, ...], transposed: bool):
    return tf.function(lambda images, params: _photometric_views(images, params, spec, ops, transposed),
                       jit_compile=True, autograph=False)


def photometric(image: tf.Tensor, params: dict[str, tf.Tensor], spec: ViewSpec,
                ops: Sequence[str] = ("flip", "jitter", "grayscale", "blur", "solarize"),
                transposed: bool = False) -> tf.Tensor:
    """Everything after the resize, on a float [size, size, 3] image in [0, 1] (bicubic may overshoot):
    clip, flip, colour jitter, grayscale, blur, solarize, normalise, each as `params` decides.
    `transposed`: the image comes [W, H, 3] (from `resize_view`)."""
    if transposed:
        image = tf.transpose(image, [1, 0, 2])
    if spec.interpolation not in ("bilinear", "nearest", "area"):
        image = tf.clip_by_value(image, 0.0, 1.0)  # bicubic/lanczos overshoot; PIL clips to uint8
    if "flip" in ops:
        image = tf.cond(params["flip"], lambda: tf.reverse(image, [1]), lambda: image)
    if "jitter" in ops:
        image = tf.cond(params["jitter"], lambda: color_jitter(image, params), lambda: image)
    if "grayscale" in ops:
        image = tf.cond(params["grayscale"], lambda: grayscale(image), lambda: image)
    if "blur" in ops:
        radius = blur_radius(spec)
        image = tf.cond(params["blur"], lambda: gaussian_blur(image, params["sigma"], radius), lambda: image)
    if "solarize" in ops:
        image = tf.cond(params["solarize"], lambda: solarize(image, spec.solarize_threshold), lambda: image)
    return normalize(image, spec.mean, spec.std)


# ------------------------------------------------------------------------------------------------ decoding
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WebP")


def is_jpeg(encoded: tf.Tensor) -> tf.Tensor:
    return tf.equal(tf.strings.substr(encoded, 0, 3), b"\xff\xd8\xff")


_HEADER_BYTES = 32  # every header field `header_shape` reads lies within the first 32 bytes


def _uint(head: tf.Tensor, offset: int, size: int, big_endian: bool = False) -> tf.Tensor:
    """The unsigned integer of `size` bytes at `offset` of `head` as int64."""
    raw = tf.io.decode_raw(tf.strings.substr(head, offset, size), tf.uint8)
    weights = [256 ** (size - 1 - i if big_endian else i) for i in range(size)]
    return tf.reduce_sum(tf.cast(raw, tf.int64) * tf.constant(weights, tf.int64))


def header_shape(encoded: tf.Tensor) -> tf.Tensor:
    """`[height, width]` (int64) read from the file header, without decoding; `[-1, -1]` for other formats.

    JPEG (`tf.image.extract_jpeg_shape`), PNG (IHDR), GIF (logical screen), BMP (DIB header, negative height =
    top-down) and WebP (VP8, VP8L and VP8X canvas): the formats `tf.io.decode_image` reads.
    """
    head = tf.strings.substr(encoded + b"\0" * _HEADER_BYTES, 0, _HEADER_BYTES)  # zero-padded: short files too
    magic = lambda m, at=0: tf.equal(tf.strings.substr(head, at, len(m)), m)  # noqa: E731
    u = functools.partial(_uint, head)
    webp = magic(b"RIFF") & magic(b"WEBP", 8)
    bmp_h = u(22, 4)
    cases = [
        (magic(b"\xff\xd8\xff"), lambda: tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)),
        (magic(b"\x89PNG\r\n\x1a\n") & magic(b"IHDR", 12), lambda: tf.stack([u(20, 4, True), u(16, 4, True)])),
        (magic(b"GIF8"), lambda: tf.stack([u(8, 2), u(6, 2)])),
        (magic(b"BM"), lambda: tf.stack([tf.where(bmp_h >= 2**31, 2**32 - bmp_h, bmp_h), u(18, 4)])),
        (webp & magic(b"VP8X", 12), lambda: tf.stack([u(27, 3) + 1, u(24, 3) + 1])),
        (webp & magic(b"VP8L", 12), lambda: tf.stack([(u(21, 4) // 2**14) % 2**14 + 1, u(21, 4) % 2**14 + 1])),
        (webp & magic(b"VP8 ", 12), lambda: tf.stack([u(28, 2) % 2**14, u(26, 2) % 2**14])),
    ]
    return tf.case(cases, default=lambda: tf.constant([-1, -1], tf.int64), exclusive=False)


def check_budget(encoded: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES
                 ) -> tf.Tensor:
    """`encoded`, once its size and header pixel count are within budget; else an InvalidArgumentError naming the rule.

    Runs before any decode, so a decompression bomb (a small file declaring a huge image) costs a header read.
    """
    nbytes = tf.cast(tf.strings.length(encoded), tf.int64)
    too_big = tf.debugging.Assert(nbytes <= max_bytes, [
        f"file is over the byte budget of {max_bytes} bytes (data.max_image_bytes): bytes =", nbytes])
    with tf.control_dependencies([too_big]):
        shape = header_shape(encoded)
    known = tf.debugging.Assert(tf.reduce_all(shape > 0), [
        f"not an image: the header is none of {', '.join(IMAGE_FORMATS)} (or declares an empty image)"])
    bomb = tf.debugging.Assert(shape[0] * shape[1] <= max_pixels, [
        f"image is over the pixel budget of {max_pixels} pixels (data.max_image_pixels): height, width =", shape])
    with tf.control_dependencies([known, bomb]):
        return tf.identity(encoded)


def decode_rgb(encoded: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES
               ) -> tf.Tensor:
    """Any image file -> uint8 [H, W, 3] (grey, CMYK, palette, RGBA, 16-bit and PNG-named-JPEG included), after
    `check_budget`."""
    image = tf.io.decode_image(check_budget(encoded, max_pixels, max_bytes), channels=3, expand_animations=False,
                               dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def as_rgb(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W] / [H, W, 1] / [H, W, 3] array -> [H, W, 3]."""
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    image.set_shape([None, None, 3])
    return tf.cast(image, tf.uint8)


def decode_region(image: tf.Tensor, sample_windows, max_pixels: int = MAX_IMAGE_PIXELS,
                  max_bytes: int = MAX_IMAGE_BYTES) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Decodes once what all views need. `sample_windows(height, width)` returns int32 [V, 4] windows.

    Returns `(region uint8 [h, w, 3], windows relative to the region [V, 4], image shape int32 [2])`. For
    a JPEG only the union of the windows is decoded (fused decode+crop); other inputs are decoded whole.
    `image` is an encoded string (decoded only within `check_budget`) or a uint8 array.
    """
    if image.dtype != tf.string:
        image = as_rgb(image)
        shape = tf.shape(image)[:2]
        return image, sample_windows(shape[0], shape[1]), shape
    image = check_budget(image, max_pixels, max_bytes)

    def jpeg():
        shape = tf.image.extract_jpeg_shape(image)[:2]
        windows = sample_windows(shape[0], shape[1])
        # libjpeg's cropped decode upsamples chroma differently in the window's edge pixels: keep a margin
        # of one MCU (16 px) so that every view sees exactly the pixels of a full decode.
        top_left = tf.maximum(tf.reduce_min(windows[:, :2], axis=0) - _JPEG_MARGIN, 0)
        bottom_right = tf.minimum(tf.reduce_max(windows[:, :2] + windows[:, 2:], axis=0) + _JPEG_MARGIN, shape)
        union = tf.concat([top_left, bottom_right - top_left], axis=0)
        region = tf.io.decode_and_crop_jpeg(image, union, channels=3)
        offset = tf.concat([top_left, [0, 0]], axis=0)
        return region, windows - offset[None], shape

    def other():
        decoded = decode_rgb(image, max_pixels, max_bytes)
        shape = tf.shape(decoded)[:2]
        return decoded, sample_windows(shape[0], shape[1]), shape

    region, windows, shape = tf.cond(is_jpeg(image), jpeg, other)
    region.set_shape([None, None, 3])
    return region, windows, shape


# ----------------------------------------------------------------------------------------------- recipes
def _used_ops(specs: Sequence[ViewSpec]) -> tuple[str, ...]:
    probs = {"flip": lambda s: s.flip_prob, "jitter": lambda s: s.color_jitter_prob,
             "grayscale": lambda s: s.grayscale_prob, "blur": lambda s: s.blur_prob,
             "solarize": lambda s: s.solarize_prob}
    return tuple(op for op, p in probs.items() if any(p(s) > 0 for s in specs))


def decode_for_views(image: tf.Tensor, seed: tf.Tensor, specs: Sequence[ViewSpec], max_pixels: int = MAX_IMAGE_PIXELS,
                     max_bytes: int = MAX_IMAGE_BYTES) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Stage 1 (may fail on corrupt or over-budget data): sample the crop windows and decode what they cover.

    Returns `(region uint8 [h, w, 3], windows relative to the region int32 [V, 4], image shape [2])`.
    """
    window_seed = tf.random.experimental.stateless_fold_in(seed, 0)
    return decode_region(image, lambda height, width: sample_crop_windows(window_seed, height, width, specs),
                         max_pixels, max_bytes)


def views_from_region(region: tf.Tensor, windows: tf.Tensor, seed: tf.Tensor,
                      specs: Sequence[ViewSpec]) -> dict[str, tf.Tensor]:
    """Stage 2 (never fails on data): crop, resize and augment every view from the decoded region.

    Views with the same size/interpolation form a group: one resize plan for all of them, then each
    view's crop + resize, then one (XLA-compiled) call for the group's photometric ops.
    """
    specs = list(specs)
    params = sample_view_params(tf.random.experimental.stateless_fold_in(seed, 1), specs)
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(_group_key(spec), []).append(i)
    views = {}
    for members in groups.values():
        group_specs = [specs[i] for i in members]
        # One static spec for the group: the blur kernel must be wide enough for the largest sigma.
        spec = dataclasses.replace(group_specs[0], blur_sigma=(0.0, max(s.blur_sigma[1] for s in group_specs)))
        ops = _used_ops(group_specs)
        idx = tf.constant(members, tf.int32)
        group_windows = tf.gather(windows, idx)
        group_params = {k: tf.gather(v, idx) for k, v in params.items()}
        # The resize coefficients of all the group's views at once (a few ops instead of a few per view),
        # each view's crop + resize (dynamic shapes: TF ops), then the photometric ops of the whole group.
        plans = resize_plans(group_windows, spec) if _pil_resized(spec) else None
        resized = [resize_view(region, group_windows[j], spec, None if plans is None else [p[j] for p in plans])
                   for j in range(len(members))]
        outs = tf.unstack(photometric_views(tf.stack([r[0] for r in resized]), group_params, spec, ops,
                                            transposed=resized[0][1]))
        for i, out in zip(members, outs):
            views[specs[i].name] = out
    return views


def make_views(image: tf.Tensor, seed: tf.Tensor, specs: Sequence[ViewSpec], *,
               return_params: bool = False) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any]]:
    """All views of one example: `{spec.name: float32 [size, size, 3]}`, normalised.

    `image` is an encoded string or a uint8 array; `seed` the example's stateless seed (int64 [2]);
    both stages in one call. With `return_params`, also returns per view the sampled decisions plus
    `crop` (absolute [top, left, h, w]) and `image_shape`, for exact tests of the recipe.
    """
    region, windows, shape = decode_for_views(image, seed, specs)
    views = views_from_region(region, windows, seed, specs)
    if not return_params:
        return views
    params = sample_view_params(tf.random.experimental.stateless_fold_in(seed, 1), specs)
    absolute = sample_crop_windows(tf.random.experimental.stateless_fold_in(seed, 0), shape[0], shape[1], specs)
    report = {spec.name: dict({k: v[i] for k, v in params.items()}, crop=absolute[i], image_shape=shape)
              for i, spec in enumerate(specs)}
    return views, report


def eval_view(image: tf.Tensor, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              antialias: bool = True) -> tf.Tensor:
    """torchvision Resize(round(size / crop_pct)) + CenterCrop(size) + normalise; `image` encoded or uint8."""
    image = decode_rgb(image) if image.dtype == tf.string else as_rgb(image)
    return eval_transform(image, size, crop_pct, interpolation, mean, std, antialias)


def eval_transform(image: tf.Tensor, size: int, crop_pct: float = 0.875, interpolation: str = "bilinear",
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   antialias: bool = True) -> tf.Tensor:
    """`eval_view` of a decoded uint8 [H, W, 3] image."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"eval crop_pct must be in (0, 1], got {crop_pct}")
    resize = int(round(size / crop_pct))
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    # torchvision: the longer side is int(resize * long / short), i.e. truncated.
    new_long = tf.cast(tf.cast(resize, tf.float64) * tf.cast(long, tf.float64) / tf.cast(short, tf.float64), tf.int32)
    new_h, new_w = tf.where(h <= w, resize, new_long), tf.where(h <= w, new_long, resize)
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method=_METHODS[interpolation], antialias=antialias)
    # torchvision CenterCrop: int(round((H - size) / 2)), round half to even.
    top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
    crop = resized[top:top + size, left:left + size] * (1.0 / 255.0)
    crop.set_shape([size, size, 3])
    if interpolation not in ("bilinear", "nearest", "area"):
        crop = tf.clip_by_value(crop, 0.0, 1.0)
    return normalize(crop, mean, std)

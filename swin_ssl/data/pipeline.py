"""tf.data pipelines: per-host sharding, deterministic shuffling, views, batching, padding, global arrays.

Entry points (everything else is plumbing)::

    cfg = default_config("moby", source="imagenet2012", data_dir="gs://...")      # swin_ssl/data/defaults.py
    it = make_train_iterator(cfg, batch_size_per_host=64, process_index=jax.process_index(),
                             process_count=jax.process_count(), seed=0, start_step=state.step)
    batch = next(it)                                  # {"view1", "view2"} float32 NHWC numpy, per host
    batch = to_global_arrays(batch, NamedSharding(mesh, P("data")))   # global jax.Arrays
    for batch in make_eval_iterator(cfg, batch_size_per_host=256, process_index=..., process_count=...):
        ...                                           # {"image", "label" int32, "mask" bool}

Config fields (`default_config` fills every one; `augment` picks the recipe's defaults):

=====================  ====================================================================================
source                 "fashion_mnist" (default) | "folder" | "imagenet2012" | any TFDS name ("tfds:NAME" too)
data_dir               Fashion-MNIST IDX dir / folder root with <split>/<class>/<image> / TFDS data_dir; None:
                       Fashion-MNIST lookup order, TFDS default dir
manual_dir             TFDS manual_dir (imagenet2012 tars); when set and the data set is not prepared, it is
train_split            "train"; slices like "train[:1000]" work for every source
eval_split             "validation" (folder: "val" or "validation"; Fashion-MNIST: "test")
image_key, label_key   TFDS feature names ("image", "label")
augment                "moby" {view1, view2} | "multicrop" {global0, global1, local0..} | "linear" {image, label}
image_size             view / global crop / linear crop / eval crop size (224)
crop_scale, crop_ratio RandomResizedCrop of views, global crops and the linear crop ((0.08, 1) or (0.4, 1); (3/4, 4/3))
interpolation          "bilinear" (MoBY, linear train) | "bicubic" (multi-crop)
antialias              low-pass filter when shrinking, as PIL does (True); False is faster and aliases
num_local_crops        N local crops (8); local_size (96), local_scale ((0.05, 0.4))
flip_prob              0.5
color_jitter           (brightness, contrast, saturation, hue) strengths (0.4, 0.4, 0.2, 0.1)
color_jitter_prob      0.8
grayscale_prob         0.2
blur_sigma             Gaussian blur std range in output pixels ((0.1, 2.0); scale it down for tiny views)
blur_prob              per view (view1, view2) or (global0, global1): (1.0, 0.1)
solarize_prob          per view: (0.0, 0.2); solarize_threshold 128 (uint8 scale)
local_blur_prob        0.5; local_solarize_prob 0.0
mean, std              ImageNet mean/std of [0, 1] RGB
eval_crop_pct          eval resizes the shorter side to round(image_size / eval_crop_pct), then centre-crops (0.875)
eval_interpolation     "bilinear" (MoBY linear eval) | "bicubic" (DINO/EsViT k-NN and linear eval)
shuffle_buffer         TFDS only (folders and Fashion-MNIST are fully permuted each epoch): 50_000
num_parallel_calls     -1 = AUTOTUNE
threads                tf.data private thread pool size; 0 = TF's shared pool
prefetch               host batches prefetched (2)
max_image_pixels       pixel budget, read from the header before decoding (89_478_485: PIL's bomb limit)
max_image_bytes        byte budget per file (64 MiB); local folders leave bigger files out at listing time
max_skip_fraction      the run stops when more of the examples read than this are unusable (0.01)
read_retries           a read error is retried this many times (after 1, 2, 4, ... s), then raises OSError (3)
=====================  ====================================================================================

Determinism and resuming. Host `h` owns a fixed slice of the split and walks an infinite stream of
positions p = 0, 1, 2, ...; position p is example `perm_e(p mod n)` of epoch `e = p // n`, where `perm_e`
is a permutation seeded by `(seed, h, e)`, and its augmentations use the stateless seed
`fold_in((seed, h), p)`. Training batch k holds positions [k*B, (k+1)*B), so `start_step=s` starts the
stream at position s*B and a resumed run reproduces the batches of an uninterrupted one, bit for bit
(folders and Fashion-MNIST: O(1), via `index_shuffle`; TFDS: epoch e is re-shuffled with its seed and
`(s*B) mod n` records are read and dropped, undecoded). Resuming with another batch size or host count
gives a different, equally valid, stream. Undecodable files do not shift the stream (see below).

Bad files. A file that fails to decode (corrupt, truncated, not an image, over a budget) raises inside the
per-example decode; that example, and only its decode, is caught: the position gets the first of a few
stand-in examples (the first decodable ones of the shard, found at construction) instead, decoded with the
position's seed and marked `_skipped`. Positions never move, so batches are the same whether a run is straight
or resumed. The Python iterator names each bad file once with the reason (`iterator.skipped`,
`iterator.num_skipped`) and raises when they exceed `max_skip_fraction` of the examples read. At construction
the first examples are decoded once: if none of them decodes the pipeline fails at once.

Read errors (anything raised outside the per-example decode: a vanished file, an NFS or object-store failure)
are never skipped: the stream is rebuilt at the failing batch after a backoff, `read_retries` times, then
`next()` raises OSError. `next()` therefore blocks while a read is outstanding or a retry waits. Folder listings
keep regular files within the byte budget only (a FIFO named `.JPEG` would block a read forever).

Evaluation visits every example of the split exactly once across hosts, in order, with the last batch of
each host padded (`mask` False, image zeros, label -1); all hosts run the same number of batches,
`ceil(max host count / batch_size_per_host)`, so collective eval steps never deadlock. A bad file's example is
masked out (`mask` False) and named.
"""
from __future__ import annotations

import collections
import logging
import math
import re
import time
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf

from swin_ssl.data import augment as aug
from swin_ssl.data import sources
from swin_ssl.data.defaults import RECIPES, default_config

try:  # TensorFlow must never take an accelerator from JAX (tensorflow-cpu has none; be safe anyway).
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):
    pass

log = logging.getLogger(__name__)
_MAX_POS = 2**62
_PROBE = 8          # examples tried at start-up to find stand-ins for undecodable ones
_RESERVE = 2        # stand-ins kept (in memory, still encoded)
_MIN_SEEN = 1000    # examples read before data.max_skip_fraction is enforced (or the whole shard if smaller)
_RETRY_WAIT_S = 1.0  # first wait before re-reading after a read error; doubles each retry
_MAX_NAMES = 1000


def _get(config: Any, key: str):
    """Reads a field, falling back to the recipe default so partial configs work too."""
    if key in config:
        return config[key]
    return default_config(config.get("augment", "moby"))[key]


def view_specs(config: Any) -> list[aug.ViewSpec]:
    """The named views the training recipe makes, in the order of the batch contract."""
    recipe = _get(config, "augment")
    common = dict(ratio=tuple(_get(config, "crop_ratio")), antialias=bool(_get(config, "antialias")),
                  flip_prob=_get(config, "flip_prob"), color_jitter=tuple(_get(config, "color_jitter")),
                  color_jitter_prob=_get(config, "color_jitter_prob"), grayscale_prob=_get(config, "grayscale_prob"),
                  blur_sigma=tuple(_get(config, "blur_sigma")), solarize_threshold=_get(config, "solarize_threshold"),
                  mean=tuple(_get(config, "mean")), std=tuple(_get(config, "std")))
    size, scale, interp = _get(config, "image_size"), tuple(_get(config, "crop_scale")), _get(config, "interpolation")
    if recipe == "linear":
        return [aug.ViewSpec("image", size, scale, common["ratio"], interp, common["antialias"],
                             flip_prob=common["flip_prob"], color_jitter_prob=0.0, grayscale_prob=0.0,
                             mean=common["mean"], std=common["std"])]
    blur, solar = tuple(_get(config, "blur_prob")), tuple(_get(config, "solarize_prob"))
    if len(blur) != 2 or len(solar) != 2:
        raise ValueError(f"blur_prob {blur} and solarize_prob {solar} need one value per view (2)")
    names = ("view1", "view2") if recipe == "moby" else ("global0", "global1")
    specs = [aug.ViewSpec(n, size, scale, interpolation=interp, blur_prob=b, solarize_prob=s, **common)
             for n, b, s in zip(names, blur, solar)]
    if recipe == "multicrop":
        specs += [aug.ViewSpec(f"local{i}", _get(config, "local_size"), tuple(_get(config, "local_scale")),
                               interpolation=interp, blur_prob=_get(config, "local_blur_prob"),
                               solarize_prob=_get(config, "local_solarize_prob"), **common)
                  for i in range(_get(config, "num_local_crops"))]
    elif recipe != "moby":
        raise ValueError(f"augment must be one of {RECIPES}, got {recipe!r}")
    return specs


def _options(config: Any) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if _get(config, "threads"):
        options.threading.private_threadpool_size = _get(config, "threads")
    return options


def _parallel(config: Any) -> int:
    parallel = _get(config, "num_parallel_calls")
    return tf.data.AUTOTUNE if parallel in (None, -1) else parallel


def _host_seed(seed: int, process_index: int) -> tf.Tensor:
    return tf.constant([seed, process_index], tf.int64)


def _epoch_seed(seed: int, process_index: int, epoch: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(tf.constant([seed + 1_000_003, process_index], tf.int64), epoch)


def _train_positions(source, seed: int, process_index: int, start: int, shuffle_buffer: int) -> tf.data.Dataset:
    """Infinite stream of `(position, example)` from `start`, reshuffled every epoch (see module doc)."""
    n = source.num_examples
    if source.random_access:
        @tf.autograph.experimental.do_not_convert
        def lookup(pos):
            index = tf.random.experimental.index_shuffle(pos % n, _epoch_seed(seed, process_index, pos // n), n - 1)
            return pos, source.get(index)
        return tf.data.Dataset.range(start, _MAX_POS).map(lookup, num_parallel_calls=tf.data.AUTOTUNE)
    records = source.stream()

    @tf.autograph.experimental.do_not_convert
    def epoch(e):
        shuffled = records.shuffle(shuffle_buffer, seed=_epoch_seed(seed, process_index, e)[0],
                                   reshuffle_each_iteration=False)
        return shuffled.enumerate().map(lambda i, ex: (e * n + i, ex))
    return tf.data.Dataset.range(start // n, _MAX_POS).flat_map(epoch).skip(start % n)


def _train_stages(config: Any, seed: int, process_index: int):
    """The two maps of the training pipeline: decode (may fail on bad data) and views (never does)."""
    specs = view_specs(config)
    host_seed = _host_seed(seed, process_index)
    linear = _get(config, "augment") == "linear"
    budget = _budget(config)

    @tf.function(autograph=False)  # traced once, shared by the start-up probe, the pipeline and `explain`
    def decode(pos, example):
        seed_ = tf.random.experimental.stateless_fold_in(host_seed, pos)
        region, windows, _ = aug.decode_for_views(example["image"], seed_, specs, **budget)
        return {"region": region, "windows": windows, "label": example["label"], "_pos": pos}

    @tf.autograph.experimental.do_not_convert
    def views(element):
        seed_ = tf.random.experimental.stateless_fold_in(host_seed, element["_pos"])
        out = aug.views_from_region(element["region"], element["windows"], seed_, specs)
        if linear:
            out["label"] = element["label"]
        out["_pos"], out["_skipped"] = element["_pos"], element["_skipped"]
        return out
    return decode, views


def check_limits(config: Any) -> None:
    """Raises ValueError naming the field when a budget or limit of untrusted input is out of range."""
    for key, low in (("max_image_pixels", 1), ("max_image_bytes", 1), ("read_retries", 0)):
        value = _get(config, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"data.{key}={value!r}: must be an integer >= {low}")
    fraction = _get(config, "max_skip_fraction")
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"data.max_skip_fraction={fraction!r}: must be a number in [0, 1]")


def _budget(config: Any) -> dict[str, int]:
    return dict(max_pixels=int(_get(config, "max_image_pixels")), max_bytes=int(_get(config, "max_image_bytes")))


def _in_order(source, start: int = 0) -> tf.data.Dataset:
    """`(index, example)` of the host shard in its stored order, from example `start`."""
    if source.random_access:
        return tf.data.Dataset.range(start, source.num_examples).map(
            tf.autograph.experimental.do_not_convert(lambda i: (i, source.get(i))))
    return source.stream().enumerate().skip(start)


_TRACE_LINES = ("File ", "Detected at node", "Graph execution error", "[[", "[Op:")


def _reason(error: tf.errors.OpError) -> str:
    """A TF error's message on one line, without the op locations and the Python stack TF appends."""
    text = re.sub(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^\]]*\]", "", error.message)
    lines = [line.strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(_TRACE_LINES))[:300]


def _fallback(source, decode, what: str) -> tf.data.Dataset | None:
    """The stand-ins for examples that fail to decode: the first `_RESERVE` examples of the shard that do.

    None for in-memory arrays (they cannot fail). Raises when none of the first `_PROBE` examples decodes (a wrong
    source, say): a pipeline that skips every example would otherwise skip forever. A read error here raises.
    """
    if isinstance(source, sources.ArraySource):
        return None
    good, errors = [], []
    for pos, example in _in_order(source).take(_PROBE):
        try:
            decode(pos, example)
        except tf.errors.InvalidArgumentError as e:
            errors.append(_reason(e))
            continue
        good.append(example)
        if len(good) == _RESERVE:
            break
    if not good:
        raise RuntimeError(f"none of the first {len(errors)} examples of {source.name} could be decoded for {what}: "
                           f"{errors}")
    return tf.data.Dataset.from_tensor_slices({k: tf.stack([ex[k] for ex in good]) for k in good[0]})


def _decode_each(ds: tf.data.Dataset, decode, fallback: tf.data.Dataset | None, parallel: int) -> tf.data.Dataset:
    """`(position, example)` -> the decoded element, or -- when the example fails to decode -- the first fallback
    example that does, decoded with the same position's seed and marked `_skipped`.

    One element per position, so batch k always holds positions [kB, (k+1)B) and a resumed run sees the batches
    of a straight one. Only decode errors are caught: the example was read upstream, where a read error stops
    the stream (and `_Batches` retries).
    """
    if fallback is None:
        return ds.map(lambda pos, ex: dict(decode(pos, ex), _skipped=tf.constant(False)), num_parallel_calls=parallel)
    alternatives = fallback.map(lambda ex: (ex, tf.constant(True)))

    @tf.autograph.experimental.do_not_convert
    def one(pos, example):
        candidates = tf.data.Dataset.from_tensors((example, tf.constant(False))).concatenate(alternatives)
        return candidates.map(lambda ex, skipped: dict(decode(pos, ex), _skipped=skipped)).ignore_errors().take(1)
    # One-element inner datasets: a deterministic interleave keeps the positions in order.
    return ds.interleave(one, cycle_length=parallel, num_parallel_calls=parallel, deterministic=True)


class _SkipTracker:
    """Names (once each) and counts the examples replaced because they failed to decode; stops the run when they
    exceed `max_fraction` of the examples read (counted once `min_seen` examples were read)."""

    def __init__(self, source, locate, explain, max_fraction: float, min_seen: int, start: int = 0):
        self.source, self.locate, self.explain = source, locate, explain
        self.max_fraction, self.min_seen, self.expected = max_fraction, min_seen, start
        self.num_seen, self.num_skipped, self.skipped, self._named = 0, 0, [], {}

    def see(self, positions: np.ndarray, skipped: np.ndarray) -> None:
        real = positions >= 0  # evaluation padding carries -1
        for pos, bad in zip(positions[real].tolist(), skipped[real].tolist()):
            if pos != self.expected:  # the example and every stand-in failed: cannot happen unless files change
                raise RuntimeError(f"{self.source.name}: example {self.source.describe(self.locate(self.expected))} "
                                   f"and every stand-in example failed to decode")
            self.expected = pos + 1
            self.num_seen += 1
            if bad:
                self._skip(pos)
        if self.num_seen >= self.min_seen and self.num_skipped > self.max_fraction * self.num_seen:
            raise RuntimeError(
                f"{self.source.name}: {self.num_skipped} of the {self.num_seen} examples read could not be used, over "
                f"data.max_skip_fraction={self.max_fraction}; fix or remove the files, or raise the limit. Files: "
                + "; ".join(f"{name} ({why})" for name, why in list(self._named.items())[:10]))

    def _skip(self, pos: int) -> None:
        index = self.locate(pos)
        name = self.source.describe(index)
        self.num_skipped += 1
        if len(self.skipped) < _MAX_NAMES:
            self.skipped.append(name)
        if name not in self._named:  # once per file; every epoch meets it again
            self._named[name] = self.explain(pos, index)
            log.warning("skipped an unusable image: %s: %s (%d skipped so far)", name, self._named[name],
                        self.num_skipped)


def _explainer(source, decode):
    """`(position, index) -> why the example fails to decode` (decoded again, eagerly; once per bad file)."""
    def explain(pos: int, index: int) -> str:
        if not source.random_access:
            return "undecodable"
        try:
            decode(tf.constant(pos, tf.int64), source.get(tf.constant(index, tf.int64)))
        except tf.errors.OpError as e:
            return _reason(e)
        return "undecodable"
    return explain


class _Batches:
    """Batches of `build(k)` (the stream from batch k on), from batch `start`. A read error (anything the
    per-example decode did not catch) rebuilds the stream at the failing batch after 1, 2, 4, ... s, `retries`
    times; then it raises OSError. The data stream is never shifted: a batch is read whole or not at all."""

    def __init__(self, build: Callable[[int], tf.data.Dataset], start: int, retries: int, what: str):
        self._build, self.step, self._retries, self._what = build, start, retries, what
        self.dataset = build(start)
        self._it = self.dataset.as_numpy_iterator()

    def __next__(self) -> dict[str, np.ndarray]:
        for attempt in range(self._retries + 1):
            try:
                batch = next(self._it)
                break
            except tf.errors.OpError as e:
                if attempt == self._retries:
                    raise OSError(f"{self._what}: reading batch {self.step} failed {attempt + 1} times "
                                  f"(data.read_retries={self._retries}): {_reason(e)}") from e
                wait = _RETRY_WAIT_S * 2**attempt
                log.warning("%s: reading batch %d failed (%s); retry %d of %d in %.0f s", self._what, self.step,
                            _reason(e), attempt + 1, self._retries, wait)
                time.sleep(wait)
                self.dataset = self._build(self.step)
                self._it = self.dataset.as_numpy_iterator()
        self.step += 1
        return batch


class TrainIterator:
    """Host batches of the training stream as dicts of numpy arrays; `dataset` is the current tf.data pipeline.

    `next()` blocks while the pipeline reads (and while it waits to retry a failed read); it raises OSError once
    the retries are spent and RuntimeError when too many images are unusable.
    """

    def __init__(self, batches: _Batches, tracker: _SkipTracker):
        self._batches, self._tracker = batches, tracker

    @property
    def dataset(self) -> tf.data.Dataset:
        return self._batches.dataset

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._batches)
        self._tracker.see(batch.pop("_pos"), batch.pop("_skipped"))
        return batch

    @property
    def num_skipped(self) -> int:
        return self._tracker.num_skipped

    @property
    def skipped(self) -> list[str]:
        return self._tracker.skipped


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _tracker(config: Any, source, locate, decode, start: int = 0) -> _SkipTracker:
    return _SkipTracker(source, locate, _explainer(source, decode), float(_get(config, "max_skip_fraction")),
                        min(source.num_examples, _MIN_SEEN), start)


def make_train_iterator(config: Any, *, batch_size_per_host: int, process_index: int | None = None,
                        process_count: int | None = None, seed: int = 0, start_step: int = 0,
                        split: str | None = None) -> TrainIterator:
    """Infinite iterator of this host's training batches (`augment` decides the keys), from `start_step`."""
    check_limits(config)
    process_index, process_count = _process(process_index, process_count)
    split = split or _get(config, "train_split")
    source = sources.make_source(config, split, process_index, process_count)
    n = source.num_examples
    if n == 0:
        raise ValueError(f"{source.name}: host {process_index} of {process_count} has no training examples")
    decode, views = _train_stages(config, seed, process_index)
    fallback = _fallback(source, decode, "training")
    parallel = _parallel(config)

    def build(step: int) -> tf.data.Dataset:
        ds = _train_positions(source, seed, process_index, step * batch_size_per_host, _get(config, "shuffle_buffer"))
        ds = _decode_each(ds, decode, fallback, parallel)
        ds = ds.map(views, num_parallel_calls=parallel)
        ds = ds.batch(batch_size_per_host, drop_remainder=True)
        return ds.prefetch(_get(config, "prefetch")).with_options(_options(config))

    def locate(pos: int) -> int:
        if not source.random_access:
            return pos
        seed_e = _epoch_seed(seed, process_index, tf.constant(pos // n, tf.int64))
        return int(tf.random.experimental.index_shuffle(tf.constant(pos % n, tf.int64), seed_e, n - 1))
    batches = _Batches(build, start_step, int(_get(config, "read_retries")), f"{source.name} (training)")
    return TrainIterator(batches, _tracker(config, source, locate, decode, start_step * batch_size_per_host))


class EvalIterable:
    """Re-iterable padded eval batches `{"image", "label", "mask"}` of one split; `len()` = batches per host.

    Images that fail to decode are masked out (`mask` False) and named; `num_skipped` / `skipped` after a pass.
    """

    def __init__(self, build: Callable[[int], tf.data.Dataset], source, num_batches: int, make_tracker,
                 retries: int):
        self.source, self.num_batches, self._build, self._make_tracker = source, num_batches, build, make_tracker
        self._retries = retries
        self.num_examples = int(sum(source.host_counts))  # over all hosts
        self.num_skipped, self.skipped = 0, []

    @property
    def dataset(self) -> tf.data.Dataset:
        return self._build(0)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        tracker = self._make_tracker()
        batches = _Batches(self._build, 0, self._retries, f"{self.source.name} (evaluation)")
        for _ in range(self.num_batches):
            batch = next(batches)
            skipped = batch.pop("_skipped")
            tracker.see(batch.pop("_pos"), skipped)
            batch["mask"] = batch["mask"] & ~skipped
            yield batch
        self.num_skipped, self.skipped = tracker.num_skipped, tracker.skipped


def make_eval_iterator(config: Any, *, batch_size_per_host: int, process_index: int | None = None,
                       process_count: int | None = None, split: str | None = None) -> EvalIterable:
    """Every example of `split` (default `eval_split`) once across hosts, eval-transformed, padded + masked."""
    check_limits(config)
    process_index, process_count = _process(process_index, process_count)
    split = split or _get(config, "eval_split")
    source = sources.make_source(config, split, process_index, process_count)
    size = _get(config, "image_size")
    num_batches = math.ceil(max(source.host_counts) / batch_size_per_host)
    budget = _budget(config)

    @tf.function(autograph=False)
    def decode(pos, example):
        image = example["image"]
        image = aug.decode_rgb(image, **budget) if image.dtype == tf.string else aug.as_rgb(image)
        return {"image": image, "label": tf.cast(example["label"], tf.int32), "_pos": pos}

    @tf.autograph.experimental.do_not_convert
    def transform(element):
        image = aug.eval_transform(element["image"], size, _get(config, "eval_crop_pct"),
                                   _get(config, "eval_interpolation"), tuple(_get(config, "mean")),
                                   tuple(_get(config, "std")), bool(_get(config, "antialias")))
        return {"image": image, "label": element["label"], "mask": tf.constant(True), "_pos": element["_pos"],
                "_skipped": element["_skipped"]}

    fallback = _fallback(source, decode, "evaluation") if source.num_examples else None
    parallel = _parallel(config)

    def build(k: int) -> tf.data.Dataset:
        ds = _decode_each(_in_order(source, k * batch_size_per_host), decode, fallback, parallel)
        ds = ds.map(transform, num_parallel_calls=parallel)
        padding = tf.data.Dataset.from_tensors({
            "image": tf.zeros([size, size, 3], tf.float32), "label": tf.constant(-1, tf.int32),
            "mask": tf.constant(False), "_pos": tf.constant(-1, tf.int64), "_skipped": tf.constant(False)}).repeat()
        ds = ds.concatenate(padding).take((num_batches - k) * batch_size_per_host)
        ds = ds.batch(batch_size_per_host, drop_remainder=True).prefetch(_get(config, "prefetch"))
        return ds.with_options(_options(config))

    return EvalIterable(build, source, num_batches, lambda: _tracker(config, source, lambda pos: pos, decode),
                        int(_get(config, "read_retries")))


# ------------------------------------------------------------------------------------------ global arrays
def to_global_arrays(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Host batch -> global `jax.Array`s with `sharding` (e.g. `NamedSharding(mesh, P("data"))`).

    Every host passes its own batch; the global batch is the concatenation over hosts in process order.
    """
    import jax
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def global_batches(iterator, sharding, prefetch: int = 2) -> Iterator[dict[str, Any]]:
    """Yields `to_global_arrays` of each batch, keeping `prefetch` transfers in flight (they are async)."""
    queue = collections.deque()
    for batch in iterator:
        queue.append(to_global_arrays(batch, sharding))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()

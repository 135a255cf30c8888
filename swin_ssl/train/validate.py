"""Config validation and duration arithmetic, run before anything is built or compiled.

Every failure is a one-line ``ValueError`` that names the config key and the rule, e.g.
``config.batch_size=12: must be divisible by the number of devices (8)``.
"""
from __future__ import annotations

import dataclasses
import os

import ml_collections

OBJECTIVE_MODULES = {"moby": "moby", "esvit": "dino", "dino": "dino"}  # config.objective -> swin_ssl.objectives.*
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Durations:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    freeze_steps: int


def _steps(config, name: str, steps_per_epoch: int) -> int | None:
    """``<name>_steps`` if set, else ``round(<name>_epochs * steps_per_epoch)``; None if neither exists."""
    steps = config.get(f"{name}_steps")
    if steps is not None:
        return int(steps)
    epochs = config.get(f"{name}_epochs")
    return None if epochs is None else int(round(float(epochs) * steps_per_epoch))


def durations(config: ml_collections.ConfigDict) -> Durations:
    """Epochs -> steps with ``steps_per_epoch = num_train_examples // batch_size`` (drop_last, as the reference)."""
    per_epoch = max(int(config.data.num_train_examples) // int(config.batch_size), 1)
    total = _steps(config, "total", per_epoch)
    warmup = _steps(config, "warmup", per_epoch) or 0
    freeze = _steps(config.optim, "freeze", per_epoch) or 0
    return Durations(per_epoch, total or 0, warmup, freeze)


def _fail(key: str, value, rule: str):
    raise ValueError(f"config.{key}={value!r}: {rule}")


def check_resolution(config: ml_collections.ConfigDict) -> None:
    """The training resolution must tile exactly (the official models do not pad at the configured size)."""
    from swin_ssl.models import create_model  # cheap: building a module does not initialise it

    size = int(config.data.image_size)
    overrides = dict(config.model.get("overrides") or {})
    model = create_model(config.model.name, **{"num_classes": 0, "img_size": size, **overrides})
    patch = int(model.patch_size)
    if size % patch:
        _fail("data.image_size", size, f"must be a multiple of the {config.model.name} patch size {patch}")
    if not hasattr(model, "window_size"):
        return
    res, stages = size // patch, len(model.depths)
    for i in range(stages):
        window = min(int(model.window_size), res)
        if res % window:
            _fail("data.image_size", size, f"stage {i} of {config.model.name} has a {res}x{res} token map that "
                  f"the {window}x{window} window does not tile (need image_size/patch/2^i divisible by the window)")
        if i < stages - 1:
            if res % 2:
                _fail("data.image_size", size, f"stage {i} token map {res}x{res} is odd; patch merging needs "
                      f"image_size/{patch} divisible by {2 ** (stages - 1)}")
            res //= 2


def check_data(config: ml_collections.ConfigDict) -> None:
    """The data must be where the config says (checked before anything heavy is built)."""
    name, data_dir = config.data.name, config.data.get("data_dir") or ""
    if name == "image_folder" and not data_dir:
        _fail("data.data_dir", data_dir, "is required for data.name='image_folder' (root of <split>/<class>/<image>)")
    if data_dir and "://" not in data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
        _fail("data.data_dir", data_dir, "directory does not exist")
    if name == "fashion_mnist":
        from swin_ssl.data import fashion_mnist
        try:
            fashion_mnist.find_dir(data_dir or None)
        except ValueError as e:
            _fail("data.data_dir", data_dir, str(e).replace("\n", " "))


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int = 1) -> Durations:
    """All checks; returns the durations in steps. Call before building models or compiling anything."""
    from swin_ssl.models import MODEL_NAMES

    if config.objective not in OBJECTIVE_MODULES:
        _fail("objective", config.objective, f"unknown objective; known: {', '.join(sorted(OBJECTIVE_MODULES))}")
    if config.model.name not in MODEL_NAMES:
        _fail("model.name", config.model.name, f"unknown model; known: {', '.join(MODEL_NAMES)}")
    if config.model.dtype not in DTYPES:
        _fail("model.dtype", config.model.dtype, f"must be one of {', '.join(DTYPES)}")
    if config.parallelism not in ("jit", "pmap"):
        _fail("parallelism", config.parallelism, "must be 'jit' or 'pmap'")
    batch = int(config.batch_size)
    if batch <= 0:
        _fail("batch_size", batch, "must be positive")
    if batch % process_count:
        _fail("batch_size", batch, f"must be divisible by the number of processes ({process_count})")
    if batch % device_count:
        _fail("batch_size", batch, f"must be divisible by the number of devices ({device_count})")
    if config.objective == "moby":
        queue = int(config.moby.queue_size)
        if queue <= 0 or queue % batch:
            _fail("moby.queue_size", queue, f"must be a positive multiple of the global batch_size ({batch})")
    if config.optim.clip_mode not in ("global", "per_param", "none"):
        _fail("optim.clip_mode", config.optim.clip_mode, "must be 'global', 'per_param' or 'none'")
    check_data(config)
    check_resolution(config)
    d = durations(config)
    if d.total_steps <= 0:
        _fail("total_steps", config.get("total_steps"), "set total_steps or total_epochs to a positive duration")
    if not 0 <= d.warmup_steps < d.total_steps:
        _fail("warmup_steps", d.warmup_steps, f"warmup must be shorter than the run ({d.total_steps} steps)")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if int(config[key]) <= 0:
            _fail(key, config[key], "must be positive")
    if config.evals.get("fn") and int(config.evals.every_steps) <= 0:
        _fail("evals.every_steps", config.evals.every_steps, "must be positive when evals.fn is set")
    if config.evals.get("fn") and ":" not in config.evals.fn:
        _fail("evals.fn", config.evals.fn, "expected 'package.module:function'")
    stop = config.get("stop_after_steps")
    if stop is not None and stop <= 0:
        _fail("stop_after_steps", stop, "must be positive (or None to run to total_steps)")
    return d

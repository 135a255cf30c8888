"""Config validation and duration arithmetic, run before anything is built or compiled.

Every failure is a one-line ``ValueError`` that names the config key and the rule, e.g.
``config.batch_size=12: must be divisible by the number of devices (8)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import os

import ml_collections

# config.objective -> swin_ssl.objectives.<module>; the objective's settings live in config.<module>.
OBJECTIVE_MODULES = {"moby": "moby", "esvit": "dino", "dino": "dino"}
DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("stop", "skip")

# The keys the trainer reads, per block (``configs/common.py`` documents them). Blocks named in FREE_FORM take any
# key (model constructor fields, evaluator kwargs); ``data`` is checked against the pipeline's own fields.
SCHEMA = {
    "": ("objective", "seed", "model", "data", "batch_size", "total_epochs", "total_steps", "warmup_epochs",
         "warmup_steps", "optim", "parallelism", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
         "async_checkpointing", "stop_after_steps", "on_nonfinite", "max_skipped_steps", "evals", "distributed",
         "moby", "dino"),
    "model": ("name", "drop_path_rate", "target_drop_path_rate", "dtype", "remat", "overrides"),
    "moby": ("queue_size", "temperature", "momentum", "proj_dim", "proj_hidden_dim", "pred_hidden_dim",
             "proj_layers", "pred_layers"),
    "dino": ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers", "norm_last_layer", "region", "view_weight",
             "region_weight", "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs", "student_temp",
             "center_momentum", "momentum", "region_chunk_size"),
    "optim": ("base_lr", "warmup_lr", "min_lr", "scale_min_lr", "lr_batch_base", "cosine_from_start", "b1", "b2", "eps",
              "weight_decay", "weight_decay_end", "clip_mode", "clip_norm", "no_decay_keywords", "decay_keywords",
              "freeze_patterns", "freeze_epochs", "freeze_steps"),
    "evals": ("every_steps", "fn", "kwargs"),
    "distributed": ("initialize", "coordinator_address", "num_processes", "process_id", "cpu_collectives"),
}
FREE_FORM = ("model.overrides", "evals.kwargs")
DATA_EXTRA_KEYS = ("name", "data_dir", "manual_dir", "num_train_examples")


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


def _data_keys() -> set[str]:
    from swin_ssl.data.pipeline import default_config

    keys = set(DATA_EXTRA_KEYS)
    for augment in ("moby", "multicrop"):
        keys.update(default_config(augment).keys())
    return keys - {"source"}


def check_keys(config: ml_collections.ConfigDict) -> None:
    """Every key must be one the trainer reads: a config file's typo (``c.optim.weight_decy = 0.1``) would otherwise
    add a new, silently ignored field (``--config.x=y`` typos already fail in ``config_flags``)."""
    def check(block: ml_collections.ConfigDict, prefix: str, known) -> None:
        for key in block.keys():
            name = f"{prefix}{key}"
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {prefix}{close[0]}?" if close else ""
                raise ValueError(f"config.{name}: unknown key{hint} (known in config{'.' + prefix[:-1] if prefix else ''}:"
                                 f" {', '.join(sorted(known))})")
            value = block[key]
            if isinstance(value, ml_collections.ConfigDict) and name not in FREE_FORM:
                check(value, f"{name}.", _data_keys() if name == "data" else SCHEMA.get(name, ()))

    check(config, "", SCHEMA[""])
    for key in ("objective", "model", "data", "batch_size", "optim", "evals"):
        if key not in config:
            _fail(key, None, "is required")
    block = OBJECTIVE_MODULES[config.objective]
    if block not in config:
        _fail(block, None, f"is required for objective {config.objective!r}")


def _model(config: ml_collections.ConfigDict):
    from swin_ssl.models import from_config  # cheap: building a module does not initialise it

    return from_config(config.model, int(config.data.image_size))


def check_resolution(config: ml_collections.ConfigDict, model) -> None:
    """The training resolution must tile exactly (the official models do not pad at the configured size)."""
    size = int(config.data.image_size)
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


def _check_range(key: str, value, low: float, high: float) -> None:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        _fail(key, value, "must be a pair (min, max)")
    if not low <= a <= b <= high:
        _fail(key, tuple(value), f"must satisfy {low} <= min <= max <= {high}")


def check_crops(config: ml_collections.ConfigDict, model) -> None:
    """Crop scales are fractions of the image; local crops must be sizes the backbone can run on.

    Local crops are not at the model's configured resolution: Swin pads their token maps to whole windows (and odd
    maps before patch merging), ViT interpolates its position embedding; both need whole patches."""
    data = config.data
    _check_range("data.crop_scale", data.get("crop_scale", (0.08, 1.0)), 1e-6, 1.0)
    if data.get("augment", "moby") != "multicrop":
        return
    _check_range("data.local_scale", data.get("local_scale", (0.05, 0.4)), 1e-6, 1.0)
    num_local, local, size = int(data.num_local_crops), int(data.local_size), int(data.image_size)
    if num_local < 0:
        _fail("data.num_local_crops", num_local, "must be >= 0")
    if num_local == 0:
        return
    patch = int(model.patch_size)
    if local <= 0 or local % patch:
        _fail("data.local_size", local, f"must be a positive multiple of the {config.model.name} patch size {patch}")
    if local > size:
        _fail("data.local_size", local, f"local crops must not be larger than the global crops (data.image_size={size})")


def check_schedules(config: ml_collections.ConfigDict, d: "Durations") -> None:
    """Every schedule must end within the run (a 30-epoch teacher warm-up in a 10-epoch run is a config mistake)."""
    if not 0 <= d.warmup_steps < d.total_steps:
        _fail("warmup_steps", d.warmup_steps, f"warmup must be shorter than the run ({d.total_steps} steps)")
    if not 0 <= d.freeze_steps < d.total_steps:
        _fail("optim.freeze_steps", d.freeze_steps, f"the frozen phase must be shorter than the run ({d.total_steps} steps)")
    if OBJECTIVE_MODULES[config.objective] == "dino":
        epochs = int(config.dino.warmup_teacher_temp_epochs)
        if epochs < 0 or epochs * d.steps_per_epoch > d.total_steps:
            _fail("dino.warmup_teacher_temp_epochs", epochs, f"the teacher-temperature warm-up ({epochs} epochs of "
                  f"{d.steps_per_epoch} steps) must not be longer than the run ({d.total_steps} steps)")


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

    if config.get("objective") not in OBJECTIVE_MODULES:
        _fail("objective", config.get("objective"), f"unknown objective; known: {', '.join(sorted(OBJECTIVE_MODULES))}")
    check_keys(config)
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
    model = _model(config)
    check_resolution(config, model)
    check_crops(config, model)
    d = durations(config)
    if d.total_steps <= 0:
        _fail("total_steps", config.get("total_steps"), "set total_steps or total_epochs to a positive duration")
    check_schedules(config, d)
    for key in ("log_every_steps", "checkpoint_every_steps"):
        if int(config[key]) <= 0:
            _fail(key, config[key], "must be positive")
    # Orbax deletes the oldest checkpoint once a new save is finalised -- even when that save failed. Keeping two
    # means the last good checkpoint survives a failed or interrupted save.
    if int(config.keep_checkpoints) < 2:
        _fail("keep_checkpoints", config.keep_checkpoints, "must be >= 2 (the last good checkpoint must survive a "
              "failed save)")
    policy = config.get("on_nonfinite", "stop")
    if policy not in NONFINITE_POLICIES:
        _fail("on_nonfinite", policy, f"must be one of {', '.join(NONFINITE_POLICIES)}")
    if int(config.get("max_skipped_steps", 0)) < 0:
        _fail("max_skipped_steps", config.max_skipped_steps, "must be >= 0")
    if config.evals.get("fn") and int(config.evals.every_steps) <= 0:
        _fail("evals.every_steps", config.evals.every_steps, "must be positive when evals.fn is set")
    if config.evals.get("fn") and ":" not in config.evals.fn:
        _fail("evals.fn", config.evals.fn, "expected 'package.module:function'")
    stop = config.get("stop_after_steps")
    if stop is not None and stop <= 0:
        _fail("stop_after_steps", stop, "must be positive (or None to run to total_steps)")
    return d

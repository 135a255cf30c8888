"""Config validation and duration arithmetic, run before anything is built or compiled.

Every failure is a one-line ``ValueError`` that names the config key and the rule, e.g.
``config.batch_size=12: must be divisible by the number of devices (8)``.
"""
from __future__ import annotations

import dataclasses
import importlib

import ml_collections

from swin_ssl import config_rules as rules

# config.objective -> swin_ssl.objectives.<module>; the objective's settings live in config.<module>, whose
# ``DEFAULTS`` are its known keys and whose ``check(config, durations)`` holds its rules.
OBJECTIVE_MODULES = {"moby": "moby", "esvit": "dino", "dino": "dino"}
DTYPES = ("float32", "bfloat16")  # float16 would need loss scaling
NONFINITE_POLICIES = ("stop", "skip")

# The trainer's own keys (``configs/common.py`` documents them); the model, optimizer, data and objective blocks
# take their keys from the module that reads them (``_schema``). FREE_FORM blocks take any key (model constructor
# fields, evaluator kwargs).
RUN_KEYS = ("objective", "seed", "model", "data", "batch_size", "total_epochs", "total_steps", "warmup_epochs",
            "warmup_steps", "optim", "parallelism", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
            "async_checkpointing", "stop_after_steps", "on_nonfinite", "max_skipped_steps", "evals", "distributed",
            "moby", "dino", "resume")
MODEL_KEYS = ("name", "drop_path_rate", "target_drop_path_rate", "dtype", "remat", "overrides")
EVALS_KEYS = ("every_steps", "fn", "kwargs")
DISTRIBUTED_KEYS = ("initialize", "coordinator_address", "num_processes", "process_id", "cpu_collectives")
FREE_FORM = ("model.overrides", "evals.kwargs")


def objective_module(name: str):
    """The ``swin_ssl.objectives`` module of ``config.objective``."""
    return importlib.import_module(f"swin_ssl.objectives.{OBJECTIVE_MODULES[name]}")


def _schema() -> dict:
    from swin_ssl.objectives import dino, moby
    from swin_ssl.train import data, optim, workdir

    return {"": RUN_KEYS, "model": MODEL_KEYS, "evals": EVALS_KEYS, "distributed": DISTRIBUTED_KEYS,
            "resume": tuple(workdir.default_config()),
            "optim": tuple(optim.defaults()), "moby": tuple(moby.DEFAULTS), "dino": tuple(dino.DEFAULTS),
            "data": tuple(data.known_keys())}


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
    """Epochs -> steps with ``steps_per_epoch = num_train_examples // batch_size`` (drop_last, as the official loaders)."""
    per_epoch = max(int(config.data.num_train_examples) // int(config.batch_size), 1)
    total = _steps(config, "total", per_epoch)
    warmup = _steps(config, "warmup", per_epoch) or 0
    freeze = _steps(config.optim, "freeze", per_epoch) or 0
    return Durations(per_epoch, total or 0, warmup, freeze)


_fail = rules.fail


def check_keys(config: ml_collections.ConfigDict) -> None:
    """Every key must be one the trainer reads: a config file's typo (``c.optim.weight_decy = 0.1``) would otherwise
    add a new, silently ignored field (``--config.x=y`` typos already fail in ``config_flags``)."""
    schema = _schema()

    def check(block: ml_collections.ConfigDict, prefix: str) -> None:
        rules.known_keys(block, schema.get(prefix[:-1], ()), prefix)
        for key in block.keys():
            name = f"{prefix}{key}"
            if isinstance(block[key], ml_collections.ConfigDict) and name not in FREE_FORM:
                check(block[key], f"{name}.")

    check(config, "")
    for key in ("objective", "model", "data", "batch_size", "optim", "evals"):
        if key not in config:
            _fail(key, None, "is required")
    block = OBJECTIVE_MODULES[config.objective]
    if block not in config:
        _fail(block, None, f"is required for objective {config.objective!r}")


def _model(config: ml_collections.ConfigDict):
    from swin_ssl.models import from_config  # cheap: building a module does not initialise it

    return from_config(config.model, int(config.data.image_size))


def check_model(config: ml_collections.ConfigDict) -> None:
    """The model block: a known name, a dtype the trainer supports, stochastic-depth rates in [0, 1]."""
    from swin_ssl.models import MODEL_NAMES

    m = config.model
    if m.name not in MODEL_NAMES:
        _fail("model.name", m.name, f"unknown model; known: {', '.join(MODEL_NAMES)}")
    if m.dtype == "float16":
        _fail("model.dtype", m.dtype, "float16 needs loss scaling, which the trainer does not do; use bfloat16")
    if m.dtype not in DTYPES:
        _fail("model.dtype", m.dtype, f"must be one of {', '.join(DTYPES)}")
    for key in ("drop_path_rate", "target_drop_path_rate"):
        rules.unit_interval(f"model.{key}", m[key])


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


def check_schedules(config: ml_collections.ConfigDict, d: "Durations") -> None:
    """The warm-up and the frozen phase must end within the run (the objectives bound their own schedules)."""
    if not 0 <= d.warmup_steps < d.total_steps:
        _fail("warmup_steps", d.warmup_steps, f"warmup must be shorter than the run ({d.total_steps} steps)")
    if not 0 <= d.freeze_steps < d.total_steps:
        _fail("optim.freeze_steps", d.freeze_steps, f"the frozen phase must be shorter than the run ({d.total_steps} steps)")


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int = 1) -> Durations:
    """All checks; returns the durations in steps. Call before building models or compiling anything."""
    from swin_ssl.train import data, optim, workdir

    if config.get("objective") not in OBJECTIVE_MODULES:
        _fail("objective", config.get("objective"), f"unknown objective; known: {', '.join(sorted(OBJECTIVE_MODULES))}")
    check_keys(config)
    if int(config.seed) < 0:
        _fail("seed", config.seed, "must be >= 0")
    check_model(config)
    if config.parallelism not in ("jit", "pmap"):
        _fail("parallelism", config.parallelism, "must be 'jit' or 'pmap'")
    batch = int(config.batch_size)
    if batch <= 0:
        _fail("batch_size", batch, "must be positive")
    if batch % process_count:
        _fail("batch_size", batch, f"must be divisible by the number of processes ({process_count})")
    if batch % device_count:
        _fail("batch_size", batch, f"must be divisible by the number of devices ({device_count})")
    optim.check(config)
    rules.positive("data.image_size", config.data.image_size)
    model = _model(config)
    data.check(config, int(model.patch_size))
    check_resolution(config, model)
    d = durations(config)
    if d.total_steps <= 0:
        _fail("total_steps", config.get("total_steps"), "set total_steps or total_epochs to a positive duration")
    check_schedules(config, d)
    objective_module(config.objective).check(config, d)
    workdir.check(config)
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

"""Shared pieces of the training configs (``ml_collections.ConfigDict``).

A training config has this schema (every recipe fills all of it; ``lock_config=True`` then makes a misspelt
``--config.x=y`` fail):

    objective              "moby" | "esvit" | "dino" (its block: moby.* or dino.*)
    seed                   int
    model.name             a ``swin_ssl.models.create_model`` name
    model.drop_path_rate   online/student stochastic depth;  model.target_drop_path_rate: target/teacher
    model.dtype            "float32" | "bfloat16" (matmuls; params, LN/BN, softmax and the loss stay fp32)
    model.remat            rematerialise each block in the backward pass (less activation memory, same results)
    model.overrides        extra create_model fields (e.g. window_size, norm_eps); {} for the MoBY recipes
    moby.*                 ``swin_ssl.objectives.moby.DEFAULTS``: queue_size, temperature, momentum (start of the
                           cosine 0.99 -> 1), proj_dim, proj_hidden_dim, pred_hidden_dim, proj_layers, pred_layers
    dino.*                 ``swin_ssl.objectives.dino.DEFAULTS`` (configs/esvit_swin_tiny.py documents them)
    data.*                 name ("imagenet2012" | "image_folder" | "fashion_mnist" | "synthetic"), data_dir,
                           image_size, num_train_examples (for epoch <-> step conversion) and the augmentation
                           fields of swin_ssl/data/pipeline.py (see data_config below)
    batch_size             GLOBAL batch (all processes); each process reads batch_size / process_count
    total_epochs | total_steps        one of them set (steps win); likewise warmup_epochs | warmup_steps
    optim.*                see ``swin_ssl/train/optim.py``: base_lr/warmup_lr/min_lr per lr_batch_base examples
                           (min_lr absolute with scale_min_lr=False, as DINO),
                           cosine_from_start, b1, b2, eps, weight_decay, weight_decay_end, clip_mode, clip_norm,
                           no_decay_keywords, decay_keywords, freeze_patterns, freeze_epochs | freeze_steps
    parallelism            "jit" (NamedSharding over a ("data",) mesh) | "pmap"
    log_every_steps, checkpoint_every_steps, keep_checkpoints, async_checkpointing
    stop_after_steps       stop this run early (schedules still span total_*); None = run to the end
    on_nonfinite           "stop" | "skip": what a non-finite loss or gradient does (the update is never applied);
                           max_skipped_steps bounds the skips of one run
    evals.every_steps, evals.fn ("module:function"), evals.kwargs   in-training evaluation hook
    distributed.*          initialize, coordinator_address, num_processes, process_id, cpu_collectives
    resume.*               allow_fresh_start, allow_config_change, read_retries, retry_seconds,
                           lock_timeout_seconds (see ``swin_ssl/train/workdir.py``)
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from swin_ssl.objectives import moby
from swin_ssl.train import optim, workdir

IMAGENET_TRAIN_EXAMPLES = 1_281_167
FASHION_MNIST_TRAIN_EXAMPLES = 60_000


def data_config(name: str, image_size: int, num_train_examples: int, data_dir: str = "") -> ml_collections.ConfigDict:
    """The ``config.data`` block: every field of ``swin_ssl.data.defaults.default_config("moby")`` (augmentation,
    splits, interpolation, ...) except ``source``, plus

    name                "synthetic" | "fashion_mnist" | "image_folder" (``data_dir/<split>/<class>/<image>``) |
                        "imagenet2012" or any TFDS name (``data_dir`` = TFDS data_dir, "" = TFDS default)
    num_train_examples  epoch <-> step conversion (drop_last: steps/epoch = num_train_examples // batch_size)

    ``swin_ssl/train/data.py`` maps ``name`` to the pipeline's ``source`` ("image_folder" -> "folder").
    """
    from swin_ssl.data.defaults import default_config

    fields = default_config("moby", image_size=image_size).to_dict()
    del fields["source"]
    fields.update(name=name, data_dir=data_dir, manual_dir="", num_train_examples=num_train_examples)
    return ml_collections.ConfigDict(fields)


def moby_config(model: str, *, epochs: int = 300, batch_size: int = 512) -> ml_collections.ConfigDict:
    """The official MoBY recipe (Transformer-SSL ``configs/moby_*.yaml``) for ``model`` on ImageNet-1K."""
    c = ml_collections.ConfigDict()
    c.objective = "moby"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(name=model, drop_path_rate=0.2, target_drop_path_rate=0.0,
                                             dtype="float32", remat=False, overrides={}))
    c.moby = ml_collections.ConfigDict(moby.DEFAULTS)
    c.data = data_config("imagenet2012", 224, IMAGENET_TRAIN_EXAMPLES)
    add_duration_fields(c, batch_size=batch_size, epochs=epochs, warmup_epochs=5)
    c.optim = optim.defaults()  # MoBY's AdamW recipe
    return add_run_fields(c)


def add_duration_fields(c: ml_collections.ConfigDict, *, batch_size: int, epochs: float,
                        warmup_epochs: float) -> None:
    """Global batch and the run's length in epochs; the ``*_steps`` twins stay unset (set, they win)."""
    c.batch_size = batch_size
    c.total_epochs = float(epochs)
    c.total_steps = config_dict.placeholder(int)
    c.warmup_epochs = float(warmup_epochs)
    c.warmup_steps = config_dict.placeholder(int)


def add_run_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The objective-independent fields: parallelism, logging, checkpoints, evals, multi-host."""
    c.parallelism = "jit"
    c.log_every_steps = 50
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.stop_after_steps = config_dict.placeholder(int)
    c.on_nonfinite = "stop"  # non-finite loss/gradient: "stop" (raise, keep the last good checkpoint) | "skip"
    c.max_skipped_steps = 10  # with "skip": stop once more steps than this were skipped in one run
    c.evals = ml_collections.ConfigDict(dict(every_steps=0, fn="", kwargs=ml_collections.ConfigDict()))
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False, coordinator_address="", num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int), cpu_collectives=""))
    c.resume = workdir.default_config()  # restart behaviour: fresh start, config changes, read retries, lock
    return c


def scale_heads(c: ml_collections.ConfigDict, hidden: int, dim: int, queue: int) -> None:
    """Shrink the MoBY heads and queue for CPU presets."""
    c.moby.proj_hidden_dim = hidden
    c.moby.pred_hidden_dim = hidden
    c.moby.proj_dim = dim
    c.moby.queue_size = queue


def apply_preset(c: ml_collections.ConfigDict, arg: str | None, presets: dict) -> ml_collections.ConfigDict:
    """``get_config("smoke")`` -> ``presets["smoke"](c)``; unknown presets fail with the list of known ones."""
    name = (arg or "paper300").strip()
    if name not in presets:
        raise ValueError(f"unknown config preset {name!r}; known: {', '.join(sorted(presets))}")
    presets[name](c)
    return c

"""Checkpoints: orbax ``CheckpointManager`` (V0 API) over ``<workdir>/checkpoints/<step>/{state,meta}``.

What is saved: ``state`` is the whole :class:`~swin_ssl.train.state.TrainState` (step, online params, optimizer
state, EMA target params, BatchNorm statistics, the objective's state -- MoBY queues + pointer -- and the RNG),
so a resumed run continues bit-for-bit (all schedules are functions of ``state.step``); ``meta`` is JSON:
``{"step", "objective", "model", "eval_backbone", "config"}``. Saving is asynchronous, keeps the last
``keep`` checkpoints, every ``every_steps`` steps, plus a final save and a save at preemption.

Loading a backbone for evaluation (k-NN / linear / export), without building a train state::

    from swin_ssl.evaluators.loading import load_network
    model, params, meta = load_network(workdir)    # latest step (or step=...); network "online" | "target" |
    feats, _ = model.apply({"params": params}, images)   # "default" = the objective's choice (meta["eval_backbone"])

Lower level: ``restore_raw(workdir)`` returns the whole saved state as nested dicts of NumPy arrays
(``["params"]["backbone"]``, ``["target_params"]["backbone"]``, ``["obj_state"]`` ...).
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
# Orbax's replica-parallel saving slices every replicated array across its replicas, which compiles one small
# slicing program per array shape (~100 compilations of ~0.1 s for a Swin state on 8 CPU devices). Only arrays
# with at least this many bytes per replica are split; the rest are written whole by replica 0.
MIN_REPLICA_SLICE_BYTES = 4 << 20
_handler_configured = False


def _configure_array_handler() -> None:
    global _handler_configured
    if _handler_configured:
        return
    absl_logger = logging.getLogger("absl")
    quiet = _DropOverrideWarning()
    absl_logger.addFilter(quiet)  # orbax warns "overriding jax.Array" on every override, which is the point here
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
            override=True)
    finally:
        absl_logger.removeFilter(quiet)
    _handler_configured = True


class _DropOverrideWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "overriding" not in record.getMessage()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, every_steps: int, keep: int, asynchronous: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    _configure_array_handler()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(int(every_steps), 1), enable_async_checkpointing=asynchronous,
        create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)  # leftovers of saves a kill interrupted
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves (asynchronously) if the interval says so or ``force``; returns whether a save started."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


def abstract_like(tree, sharding) -> Any:
    """ShapeDtypeStructs with ``sharding``: orbax restores straight into that placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _step_dirs(directory: str) -> list[int]:
    """Finished step directories, newest first (orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when
    the save is complete, so a save interrupted by a kill never shows up here)."""
    if not os.path.isdir(directory):
        return []
    return sorted((int(name) for name in os.listdir(directory) if name.isdigit()), reverse=True)


def _shapes(tree) -> dict[str, tuple]:
    """``{path: shape}``; paths normalised so a state dict (``['opt_state']['1']``) and orbax's saved metadata
    (tuples stored as lists: ``['opt_state'][1]``) agree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {re.sub(r"\['(\d+)'\]", r"[\1]", jax.tree_util.keystr(path)): tuple(leaf.shape) for path, leaf in flat}


def _read_meta(path: str) -> dict:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(os.path.join(path, "meta"))


def _quarantine(workdir: str, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (never deletes it): ``<workdir>/unreadable_checkpoints/``."""
    target = os.path.join(os.path.abspath(workdir), UNREADABLE_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(checkpoint_dir(workdir), str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"swin_ssl quarantine {step}")
    return target


def restore_latest(workdir: str, abstract_state, expect: dict | None = None) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the newest readable checkpoint in ``workdir``, placed as ``abstract_state`` says;
    None if there is no checkpoint at all.

    A checkpoint whose files cannot be read (corrupted, truncated, half-copied) is moved to
    ``<workdir>/unreadable_checkpoints/`` with a warning and the previous one is tried; if none is readable this
    raises. A checkpoint of another run (``meta`` disagrees with ``expect``, e.g. another model, or the saved
    shapes differ from ``abstract_state``) is not corruption: it raises ValueError and nothing is moved.
    """
    directory = checkpoint_dir(workdir)
    state_dict = flax.serialization.to_state_dict(abstract_state)
    problems = []
    for step in _step_dirs(directory):
        path = os.path.join(directory, str(step))
        try:
            meta = _read_meta(path)
            with ocp.PyTreeCheckpointer() as checkpointer:
                saved = checkpointer.metadata(os.path.join(path, "state")).item_metadata.tree
        except Exception as e:  # noqa: BLE001 -- any read failure makes the step unusable
            problems.append(_give_up_on(workdir, step, e))
            continue
        for key, want in (expect or {}).items():
            if meta.get(key) != want:
                raise ValueError(f"{path} is a checkpoint with {key}={meta.get(key)!r} but the config has "
                                 f"{want!r}: use another --workdir or the config of that run")
        want_shapes, saved_shapes = _shapes(state_dict), _shapes(saved)
        if want_shapes != saved_shapes:
            diff = sorted(set(want_shapes.items()) ^ set(saved_shapes.items()))[:4]
            raise ValueError(f"{path} does not match the configured train state (first differences, "
                             f"(path, shape): {diff}); use another --workdir or the config of that run")
        logging.info("Restoring checkpoint of step %d from %s", step, directory)
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                state = checkpointer.restore(os.path.join(path, "state"), abstract_state)
        except Exception as e:  # noqa: BLE001
            problems.append(_give_up_on(workdir, step, e))
            continue
        return state, meta
    if problems:
        raise RuntimeError(f"no readable checkpoint in {directory} (moved aside: {'; '.join(problems)}); remove "
                           f"the workdir or restore a good checkpoint into it")
    return None


def _give_up_on(workdir: str, step: int, error: Exception) -> str:
    reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    target = _quarantine(workdir, step)
    logging.warning("Checkpoint of step %d is unreadable (%s: %s); moved it to %s and trying the previous one.",
                    step, type(error).__name__, reason, target)
    return f"step {step}: {type(error).__name__}: {reason}"


def latest_step(workdir: str) -> int | None:
    """Latest finished checkpoint step in ``workdir`` (None if there is none)."""
    steps = _step_dirs(checkpoint_dir(workdir))
    return steps[0] if steps else None


def restore_raw(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """The whole saved state as nested dicts of NumPy arrays (no train-state class needed) and its meta."""
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
    path = os.path.join(checkpoint_dir(workdir), str(step))
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(os.path.join(path, "state")).item_metadata.tree
        to_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = checkpointer.restore(os.path.join(path, "state"), restore_args=to_numpy)
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        meta = checkpointer.restore(os.path.join(path, "meta"))
    return state, meta

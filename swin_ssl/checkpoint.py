"""Checkpoints: orbax ``CheckpointManager`` (V0 API) over ``<workdir>/checkpoints/<step>/{state,meta}``.

What is saved: ``state`` is the whole :class:`~swin_ssl.train.state.TrainState` (step, online params, optimizer
state, EMA target params, BatchNorm statistics, the objective's state -- MoBY queues + pointer -- and the RNG),
so a resumed run continues bit-for-bit (all schedules are functions of ``state.step``); ``meta`` is JSON:
``{"step", "objective", "model", "eval_backbone", "config"}``. Saving is asynchronous, keeps the last
``keep`` checkpoints, every ``every_steps`` steps, plus a final save and a save at preemption.

Loading the backbones for evaluation (k-NN / linear / export), without building a train state::

    from swin_ssl import checkpoint
    ckpt = checkpoint.load_backbones(workdir)            # latest step; or step=...
    ckpt["online"]     # online encoder params  (MoBY: what the official linear eval uses, ``encoder.*``)
    ckpt["target"]     # EMA target encoder params (MoBY ``encoder_k.*``; DINO/EsViT: the teacher)
    ckpt["default"]    # the objective's choice for evaluation (meta["eval_backbone"]: "online" or "target")
    ckpt["meta"]       # step, objective, model name, full training config (dict)
    model = swin_ssl.models.create_model(ckpt["meta"]["model"], num_classes=0)   # + config overrides
    feats, _ = model.apply({"params": ckpt["default"]}, images)

The params come back as NumPy arrays in the same nested-dict layout the model's ``init`` produces.
Lower level: ``restore_raw(workdir)`` returns the whole saved state as nested dicts
(``["params"]["backbone"]``, ``["target_params"]["backbone"]``, ``["obj_state"]`` ...).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
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
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves (asynchronously) if the interval says so or ``force``; returns whether a save started."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


def abstract_like(tree, sharding) -> Any:
    """ShapeDtypeStructs with ``sharding``: orbax restores straight into that placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the latest checkpoint, placed as ``abstract_state`` says; None if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    logging.info("Restoring checkpoint of step %d from %s", step, manager.directory)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def latest_step(workdir: str) -> int | None:
    """Latest finished checkpoint step in ``workdir`` (None if there is none)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    manager.close()
    return step


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


def load_backbones(workdir: str, step: int | None = None) -> dict:
    """``{"online", "target", "default", "meta"}`` -- see the module docstring."""
    state, meta = restore_raw(workdir, step)
    online = state["params"]["backbone"]
    target = state["target_params"]["backbone"]
    default = target if meta.get("eval_backbone") == "target" else online
    return {"online": online, "target": target, "default": default, "meta": meta}

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
import re
import time
from typing import Any, Callable

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from swin_ssl import hosts, storage
from swin_ssl.hosts import RunRefused, StorageUnavailable

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
    return storage.join(workdir, CHECKPOINT_DIR)


def make_manager(workdir: str, *, every_steps: int, keep: int, asynchronous: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    _configure_array_handler()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(int(every_steps), 1), enable_async_checkpointing=asynchronous,
        create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)  # leftovers of saves a kill interrupted
    return ocp.CheckpointManager(storage.as_path(checkpoint_dir(workdir)), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves (asynchronously) if the interval says so or ``force``; returns whether a save started."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=force)


def abstract_like(tree, sharding) -> Any:
    """ShapeDtypeStructs with ``sharding``: orbax restores straight into that placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# --- reading, on one process at a time -----------------------------------------------------------------------------
# Reads go through orbax's handlers, not its Checkpointers: a Checkpointer waits for every process at the end of
# a restore, so a read error on one host would leave the others waiting. Agreement is made explicit instead
# (``swin_ssl/hosts.py``).

_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED")


def is_transient(error: BaseException) -> bool:
    """Whether a read error may go away by itself (network, stale NFS handle, memory) rather than mean that the
    checkpoint is damaged (truncated, corrupted, missing files)."""
    if isinstance(error, (MemoryError, TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, IsADirectoryError,
                                                             NotADirectoryError)):
        return True
    text = str(error)
    return any(text.startswith(status) or f"{status}:" in text for status in _TRANSIENT_STATUS)


def read_with_retries(read: Callable[[], Any], what: str, retries: int = 3, retry_seconds: float = 2.0) -> Any:
    """``read()``, retried with doubling back-off while it fails for a transient reason."""
    for attempt in range(retries + 1):
        try:
            return read()
        except Exception as e:  # noqa: BLE001 -- classified below
            if not is_transient(e) or attempt == retries:
                raise
            delay = retry_seconds * 2 ** attempt
            logging.warning("Reading %s failed (%s: %s); retrying in %.1f s.", what, type(e).__name__,
                            _first_line(e), delay)
            time.sleep(delay)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


def _step_dirs(directory: str) -> list[int]:
    """Finished step directories, newest first (orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it when
    the save is complete, so a save interrupted by a kill never shows up here)."""
    path = storage.as_path(directory)
    if not path.exists():
        return []
    return sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)


def _shapes(tree) -> dict[str, tuple]:
    """``{path: shape}``; paths normalised so a state dict (``['opt_state']['1']``) and orbax's saved metadata
    (tuples stored as lists: ``['opt_state'][1]``) agree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {re.sub(r"\['(\d+)'\]", r"[\1]", jax.tree_util.keystr(path)): tuple(leaf.shape) for path, leaf in flat}


def _read_meta(path: str) -> dict:
    return ocp.JsonCheckpointHandler().restore(storage.as_path(path) / "meta")


def _saved_tree(path: str):
    return ocp.PyTreeCheckpointHandler().metadata(storage.as_path(path) / "state").tree


def _read_arrays(path: str, item=None):
    """The saved state as NumPy arrays, in ``item``'s structure when given (else nested dicts)."""
    target = _saved_tree(path) if item is None else item
    to_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    return ocp.PyTreeCheckpointHandler().restore(storage.as_path(path) / "state",
                                                 args=ocp.args.PyTreeRestore(item=item, restore_args=to_numpy))


def _place(tree, abstract_state):
    """Host arrays -> global arrays placed as ``abstract_state`` says (each process fills its own devices)."""
    return jax.tree.map(lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda index: x[index]),
                        tree, abstract_state)


# --- restoring a run, one decision for all hosts ------------------------------------------------------------------

def _quarantined(workdir: str) -> list[str]:
    path = storage.as_path(storage.join(workdir, UNREADABLE_DIR))
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def _quarantine(workdir: str, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (never deletes it): ``<workdir>/unreadable_checkpoints/``."""
    target = storage.join(workdir, UNREADABLE_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    storage.move(storage.join(checkpoint_dir(workdir), str(step)), target)
    return target


def _give_up_on(workdir: str, step: int, reason: str) -> str:
    target = _quarantine(workdir, step)
    logging.warning("Checkpoint of step %d is unreadable (%s); moved it to %s and trying the previous one.",
                    step, reason, target)
    return f"step {step}: {reason}"


def _choose_step(workdir: str, abstract_state, expect: dict, resume) -> dict | None:
    """Process 0: ``{"step", "meta"}`` of the newest readable checkpoint whose run matches, None to start fresh.
    Damaged checkpoints are moved aside on the way; a transient error moves nothing and stops."""
    directory = checkpoint_dir(workdir)
    retry = dict(retries=int(resume.read_retries), retry_seconds=float(resume.retry_seconds))
    moved = []
    try:
        steps = read_with_retries(lambda: _step_dirs(directory), directory, **retry)
    except Exception as e:  # noqa: BLE001
        raise StorageUnavailable(f"cannot list {directory} now ({type(e).__name__}: {_first_line(e)}); nothing "
                                 f"was changed: rerun later") from e
    for step in steps:
        path = storage.join(directory, str(step))
        try:
            meta, saved = read_with_retries(lambda: (_read_meta(path), _saved_tree(path)), path, **retry)
        except Exception as e:  # noqa: BLE001
            if is_transient(e):
                raise StorageUnavailable(f"cannot read {path} now ({type(e).__name__}: {_first_line(e)}) after "
                                         f"{retry['retries']} retries; nothing was moved: rerun later") from e
            moved.append(_give_up_on(workdir, step, f"{type(e).__name__}: {_first_line(e)}"))
            continue
        for key, want in expect.items():
            if meta.get(key) != want:
                raise ValueError(f"{path} is a checkpoint with {key}={meta.get(key)!r} but the config has "
                                 f"{want!r}: use another --workdir or the config of that run")
        want_shapes, saved_shapes = _shapes(flax.serialization.to_state_dict(abstract_state)), _shapes(saved)
        if want_shapes != saved_shapes:
            diff = sorted(set(want_shapes.items()) ^ set(saved_shapes.items()))[:4]
            raise ValueError(f"{path} does not match the configured train state (first differences, "
                             f"(path, shape): {diff}); use another --workdir or the config of that run")
        return {"step": step, "meta": meta}
    lost = _quarantined(workdir)
    if lost and not resume.allow_fresh_start:
        what = "; ".join(moved) if moved else "none left"
        raise RunRefused(f"no readable checkpoint in {directory} ({what}), although this run has had checkpoints "
                         f"(now in {storage.join(workdir, UNREADABLE_DIR)}): restore a good one into {directory}, "
                         f"or set --config.resume.allow_fresh_start=True to train from step 0")
    return None


_OK, _DAMAGED, _UNAVAILABLE = 0, 1, 2


def restore_latest(workdir: str, abstract_state, *, expect: dict, resume) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the newest readable checkpoint in ``workdir``, placed as ``abstract_state`` says; None
    when the run starts fresh. The same outcome on every process:

    * process 0 picks the step (listing and metadata are read there only) and every process reads that step;
    * a damaged checkpoint (on any host) is moved to ``<workdir>/unreadable_checkpoints/`` by process 0 and the
      previous one is tried; a checkpoint of another run (``meta`` disagrees with ``expect`` or the saved shapes
      differ) raises ValueError and nothing is moved;
    * a read that fails for a transient reason is retried (``resume.read_retries``, ``resume.retry_seconds``),
      then raises :class:`StorageUnavailable` with nothing moved;
    * when no checkpoint is readable but the run has had some, :class:`RunRefused` unless
      ``resume.allow_fresh_start``.

    ``resume`` is the ``config.resume`` block (``swin_ssl/train/workdir.py``).
    """
    while True:
        chosen = hosts.leader_decides(lambda: _choose_step(workdir, abstract_state, expect, resume))
        if chosen is None:
            return None
        step, path = chosen["step"], storage.join(checkpoint_dir(workdir), str(chosen["step"]))
        logging.info("Restoring checkpoint of step %d from %s", step, checkpoint_dir(workdir))
        outcome, state, reason = _OK, None, ""
        try:
            state = read_with_retries(lambda: _read_arrays(path, abstract_state), path,
                                      retries=int(resume.read_retries), retry_seconds=float(resume.retry_seconds))
        except Exception as e:  # noqa: BLE001 -- every host must reach the agreement below
            outcome, reason = (_UNAVAILABLE if is_transient(e) else _DAMAGED), f"{type(e).__name__}: {_first_line(e)}"
            logging.warning("Process %d could not read %s: %s", jax.process_index(), path, reason)
        outcomes = hosts.gather_ints(outcome)
        if all(o == _OK for o in outcomes):
            return _place(state, abstract_state), chosen["meta"]
        failed = [i for i, o in enumerate(outcomes) if o != _OK]
        if _UNAVAILABLE in outcomes:
            raise StorageUnavailable(f"cannot read {path} now (process {failed}; see the log of each) after "
                                     f"{int(resume.read_retries)} retries; nothing was moved: rerun later")
        hosts.leader_decides(lambda: _give_up_on(workdir, step, reason or f"unreadable on process {failed}"))


def latest_step(workdir: str) -> int | None:
    """Latest finished checkpoint step in ``workdir`` (None if there is none)."""
    steps = _step_dirs(checkpoint_dir(workdir))
    return steps[0] if steps else None


def has_checkpoints(workdir: str) -> bool:
    """Whether this workdir's run has ever written a checkpoint (a finished one, or one moved aside)."""
    return bool(_step_dirs(checkpoint_dir(workdir)) or _quarantined(workdir))


def restore_raw(workdir: str, step: int | None = None) -> tuple[dict, dict]:
    """The whole saved state as nested dicts of NumPy arrays (no train-state class needed) and its meta."""
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {checkpoint_dir(workdir)}")
    path = storage.join(checkpoint_dir(workdir), str(step))
    return _read_arrays(path), _read_meta(path)

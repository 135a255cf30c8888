"""One decision for all hosts: process 0 decides, every process gets the same answer or the same error.

On several hosts, anything read from shared storage (which checkpoint to restore, whether the workdir is locked,
whether the configuration changed) is read by process 0 only; its outcome -- a JSON value or an error -- is
broadcast, so all hosts act alike even when one of them would have seen a transient read error. Each helper is a
no-op collective on a single process, so the same code path runs on a laptop and on a pod.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np


class RunRefused(RuntimeError):
    """The run cannot start as asked (a live lock, a changed configuration, checkpoints lost): nothing was
    changed; the message says what to do."""


class StorageUnavailable(RuntimeError):
    """Storage could not be read now (after retries): nothing was moved or written; rerun later."""


_ERRORS = {cls.__name__: cls for cls in (RunRefused, StorageUnavailable, ValueError, FileNotFoundError)}


def is_leader() -> bool:
    return jax.process_index() == 0


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-serialisable ``value`` on every process (the others' ``value`` is ignored)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    data = json.dumps(value).encode() if is_leader() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.frombuffer(data, np.uint8) if is_leader() else np.zeros(size, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def gather_ints(value: int) -> list[int]:
    """Every process's ``value``, in process order."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)]


def leader_decides(decide: Callable[[], Any]) -> Any:
    """Runs ``decide()`` on process 0 only and returns its result on every process. An error it raises is raised
    on every process with the same message (the kinds above as themselves, any other as RuntimeError on the other
    processes), so no host is left waiting in a collective."""
    outcome, error = None, None
    if is_leader():
        try:
            outcome = {"value": decide()}
        except Exception as e:  # noqa: BLE001 -- every process must learn of it
            error = e
            kind = next((name for name, cls in _ERRORS.items() if isinstance(e, cls)), None)
            outcome = {"error": kind, "message": str(e) if kind else f"{type(e).__name__}: {e}"}
    outcome = broadcast_json(outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        raise _ERRORS.get(outcome["error"], RuntimeError)(outcome["message"])
    return outcome["value"]

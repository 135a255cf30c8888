"""What a run keeps in its workdir besides checkpoints: a lock and the run-defining configuration.

* ``lock.json`` -- who runs on this workdir (host, pid, start, heartbeat). A second ``train.py`` started on a live
  workdir by mistake refuses instead of racing the first run's saves. The lock is released on every orderly exit
  (finished, preempted, failed); one left by a killed run is stale and taken over: on the same host when its
  process is gone, from another host once its heartbeat is older than ``resume.lock_timeout_seconds``.
* ``run_config.json`` -- the configuration that defines the run (model, objective, batch, sizes, data, seed,
  schedules, ...). A rerun whose run-defining configuration differs is refused with one line naming each key and
  its two values, unless ``resume.allow_config_change`` is set. Keys in :data:`CHANGEABLE_KEYS` (logging,
  checkpoint cadence, paths, parallel layout) may change freely.

Both files are read and written by process 0 only (see ``swin_ssl/hosts.py``).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

import ml_collections
from flax import traverse_util

from swin_ssl import storage
from swin_ssl.hosts import RunRefused

LOCK_FILE = "lock.json"
RUN_CONFIG_FILE = "run_config.json"

# Dotted config keys (and key prefixes) a rerun may change: they do not change what the run computes.
CHANGEABLE_KEYS = (
    "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "async_checkpointing", "stop_after_steps",
    "on_nonfinite", "max_skipped_steps", "parallelism", "evals", "distributed", "resume", "model.remat",
    "data.data_dir", "data.manual_dir", "data.num_parallel_calls", "data.threads", "data.prefetch",
)


def default_config() -> ml_collections.ConfigDict:
    """The ``config.resume`` block."""
    return ml_collections.ConfigDict(dict(
        allow_fresh_start=False,    # start from step 0 although every checkpoint of this run is unreadable
        allow_config_change=False,  # resume although the run-defining configuration changed
        read_retries=3,             # a checkpoint read that fails for a transient reason is retried this often
        retry_seconds=2.0,          # first back-off; doubles on each retry
        lock_timeout_seconds=900.0,  # a lock from another host whose heartbeat is older than this is stale
    ))


def check(config: ml_collections.ConfigDict) -> None:
    """One-line ``ValueError`` for a bad ``config.resume`` block."""
    r = config.resume
    if int(r.read_retries) < 0:
        raise ValueError(f"config.resume.read_retries={r.read_retries}: must be >= 0")
    if not float(r.retry_seconds) >= 0:
        raise ValueError(f"config.resume.retry_seconds={r.retry_seconds}: must be >= 0")
    if not float(r.lock_timeout_seconds) > 0:
        raise ValueError(f"config.resume.lock_timeout_seconds={r.lock_timeout_seconds}: must be > 0")


# --- the lock ----------------------------------------------------------------------------------------------------

def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_json(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a half-written or foreign file: treat as no information
        return {}


class WorkdirLock:
    """The lock of one workdir, held by process 0 of the run that created it."""

    def __init__(self, workdir: str, timeout: float):
        self.path = storage.as_path(storage.join(workdir, LOCK_FILE))
        self.timeout = float(timeout)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                     "started": time.time(), "heartbeat": time.time()}

    def acquire(self) -> None:
        """Takes the lock or raises :class:`RunRefused` naming the holder."""
        held = _read_json(self.path)
        if held is not None:
            stale, why = self._stale(held)
            if not stale:
                raise RunRefused(f"{self.path} says this workdir is in use by pid {held.get('pid')} on "
                                 f"{held.get('host')} (started {_when(held.get('started'))}, {why}); a second run "
                                 f"on it would overwrite the first one's checkpoints. Use another --workdir, or "
                                 f"delete {self.path} if that run is gone")
            logging.warning("Taking over a stale lock %s (pid %s on %s: %s).", self.path, held.get("pid"),
                            held.get("host"), why)
            self.path.unlink(missing_ok=True)
        self._create()

    def _stale(self, held: dict) -> tuple[bool, str]:
        if not held:
            return True, "unreadable lock file"
        if held.get("host") == self.info["host"]:
            alive = held.get("pid") != os.getpid() and _process_alive(int(held.get("pid", -1)))
            return (not alive), ("process running" if alive else "process no longer running")
        age = time.time() - float(held.get("heartbeat", 0))
        if age > self.timeout:
            return True, f"no heartbeat for {age:.0f} s > resume.lock_timeout_seconds={self.timeout:g}"
        return False, f"last heartbeat {age:.0f} s ago"

    def _create(self) -> None:
        data = json.dumps(self.info).encode()
        if storage.is_remote(self.path):
            # Object stores have no exclusive create here: write, then read back to see who won a race.
            storage.atomic_write_bytes(self.path, data)
            time.sleep(0.5)
            won = (_read_json(self.path) or {}).get("token") == self.info["token"]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                won = False
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                won = True
        if not won:
            raise RunRefused(f"{self.path}: another run took the lock of this workdir at the same moment")

    def heartbeat(self) -> None:
        """Refreshes the heartbeat, at most every quarter of the timeout (cheap to call every step)."""
        now = time.time()
        if now - self.info["heartbeat"] >= self.timeout / 4:
            self.info["heartbeat"] = now
            storage.atomic_write_text(self.path, json.dumps(self.info))

    def release(self) -> None:
        """Removes the lock if it is still ours."""
        held = _read_json(self.path)
        if held and held.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)


def _when(timestamp) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(timestamp))) if timestamp else "?"


# --- the run-defining configuration --------------------------------------------------------------------------------

def run_defining(config: ml_collections.ConfigDict) -> dict:
    """``{dotted key: value}`` of every field that defines what the run computes (JSON values)."""
    flat = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    return {k: v for k, v in sorted(flat.items())
            if not any(k == c or k.startswith(c + ".") for c in CHANGEABLE_KEYS)}


def differences(recorded: dict, current: dict) -> list[str]:
    """``"key: recorded -> current"`` for every run-defining key whose value differs."""
    missing = "(absent)"
    return [f"{k}: {json.dumps(recorded.get(k, missing))} -> {json.dumps(current.get(k, missing))}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k, missing) != current.get(k, missing)]


def check_run_config(workdir: str, config: ml_collections.ConfigDict, *, resuming: bool) -> bool:
    """When ``resuming`` a run that already has checkpoints, refuses a different run-defining configuration
    (:class:`RunRefused`) unless ``config.resume.allow_config_change``. Returns whether ``run_config.json`` must be
    (re)written, which :func:`record_run_config` does once the checkpoint was restored (a refused restore must not
    leave the new configuration recorded)."""
    recorded = _read_json(storage.as_path(storage.join(workdir, RUN_CONFIG_FILE))) if resuming else None
    if not recorded:
        return True
    diffs = differences(recorded, run_defining(config))
    if diffs and not config.resume.allow_config_change:
        raise RunRefused(f"{workdir} holds a run with another configuration ({'; '.join(diffs)}): rerun with "
                         f"the recorded values, use another --workdir, or set "
                         f"--config.resume.allow_config_change=True")
    if diffs:
        logging.warning("Resuming with a changed configuration (resume.allow_config_change): %s", "; ".join(diffs))
    return bool(diffs)


def record_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the run-defining configuration to ``<workdir>/run_config.json`` (atomically)."""
    storage.atomic_write_text(storage.join(workdir, RUN_CONFIG_FILE),
                              json.dumps(run_defining(config), indent=1, sort_keys=True))

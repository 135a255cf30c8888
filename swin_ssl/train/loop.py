"""``train_and_evaluate(config, workdir)``: the training loop behind ``train.py``.

Order of work: distributed init -> config validation (one-line errors, nothing compiled yet) -> the workdir
lock and the run-defining configuration (``swin_ssl/train/workdir.py``; decided by process 0 for all hosts) ->
build the objective, optimizer and the compiled init/step -> restore the latest readable checkpoint in
``workdir`` if any (``swin_ssl/checkpoint.py``) -> loop: step, progress, periodic metrics (TensorBoard +
console), checkpoints, optional evaluation hook -> final checkpoint. ``workdir`` may be a ``gs://`` URL.

Plugging in another objective: see ``swin_ssl/train/program.py`` (what gets compiled for a config).

In-training evaluation: with ``config.evals.every_steps > 0`` and ``config.evals.fn = "package.module:function"``
the loop calls ``function(config=config, params={"online": ..., "target": ..., "default": ...}, step=step,
workdir=workdir, **config.evals.kwargs)`` every that many steps (and after the last step); it returns a
mapping of scalars, written under ``eval/<name>``. ``params`` are the (replicated) backbone params.
"""
from __future__ import annotations

import importlib
import itertools
import json
import logging
import math
import queue
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from swin_ssl import checkpoint as ckpt_lib
from swin_ssl import hosts, storage
from swin_ssl import metrics as metrics_lib
from swin_ssl.train import data as data_lib
from swin_ssl.train import parallel as parallel_lib
from swin_ssl.train import workdir as workdir_lib
from swin_ssl.train.program import build_program
from swin_ssl.train.state import Objective, TrainState
from swin_ssl.train.validate import Durations, validate

# Exit statuses of train.py (a restart loop reruns on the first two; see the README).
EXIT_PREEMPTED = 143      # stopped by SIGTERM / the preemption service after saving: rerun to resume
EXIT_RETRY_LATER = 75     # storage could not be read now; nothing was changed: rerun later
EXIT_REFUSED = 2          # the run cannot start as asked (lock, changed config, lost checkpoints): see the message


def _resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"config.evals.fn={spec!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def run_evals(config, state: TrainState, objective: Objective, step: int, workdir: str, writer) -> dict:
    fn = _resolve(config.evals.fn)
    params = {"online": state.params["backbone"], "target": state.target_params["backbone"]}
    params["default"] = params[objective.eval_backbone]
    kwargs = config.evals.kwargs.to_dict() if config.evals.get("kwargs") is not None else {}
    results = dict(fn(config=config, params=params, step=step, workdir=workdir, **kwargs) or {})
    if results:
        metrics_lib.write_scalars(writer, step, {f"eval/{k}": v for k, v in results.items()})
    return results


def _meta(config, objective: Objective, step: int) -> dict:
    return {"step": step, "objective": config.objective, "model": config.model.name,
            "eval_backbone": objective.eval_backbone, "config": json.loads(config.to_json_best_effort())}


class NonFiniteGuard:
    """Reads each step's ``finite`` flag one step late (so the host never waits on the step it just dispatched)
    and acts on a non-finite loss/gradient: ``"stop"`` raises :class:`FloatingPointError` naming the step and the
    signal; ``"skip"`` counts it (the step already left the state untouched) and raises only past
    ``max_skipped`` skips. Call :meth:`flush` before anything that must not see a bad step (a checkpoint)."""

    def __init__(self, policy: str, max_skipped: int):
        self.policy, self.max_skipped = policy, max_skipped
        self.skipped: list[int] = []
        self._pending: tuple[int, dict] | None = None

    def push(self, step: int, metrics: dict) -> None:
        previous, self._pending = self._pending, (step, metrics)
        if previous is not None:
            self._check(*previous)

    def flush(self) -> None:
        previous, self._pending = self._pending, None
        if previous is not None:
            self._check(*previous)

    def _check(self, step: int, metrics: dict) -> None:
        if bool(jax.device_get(metrics["finite"])):
            return
        loss, grad_norm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
        if not math.isfinite(loss):
            signal = f"loss={loss}"
        elif not math.isfinite(grad_norm):
            signal = f"gradient norm={grad_norm}"
        else:  # the update itself (lr, weight decay, eps) made the parameters, moments, target or statistics bad
            signal = "updated state (parameters, optimizer moments, EMA target, queues/centers or BatchNorm statistics)"
        if self.policy == "skip" and len(self.skipped) < self.max_skipped:
            self.skipped.append(step)
            logging.warning("Non-finite %s at step %d: update skipped (%d of at most %d skips).", signal, step,
                            len(self.skipped), self.max_skipped)
            return
        why = (f"after {len(self.skipped)} skipped steps (config.max_skipped_steps={self.max_skipped})"
               if self.policy == "skip" else "(config.on_nonfinite='stop')")
        raise FloatingPointError(f"non-finite {signal} at step {step} {why}: training stopped; the update was not "
                                 f"applied and no checkpoint after step {step - 1} was written")


class SigtermFlag:
    """Single-process preemption: SIGTERM (what schedulers send before a kill) sets a flag the loop reads at the
    next step boundary. Multi-process runs leave SIGTERM to JAX's preemption service, which orbax's
    ``reached_preemption`` reads in sync on every host (a local flag would make hosts disagree on the step)."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class BatchFeeder:
    """Reads the host's batches in a background thread, so the loop can notice a SIGTERM while the input is
    stalled (a hung file read, a slow network mount) and stop within about ``poll_seconds``."""

    def __init__(self, batches: Iterator[dict], count: int, poll_seconds: float = 0.5, depth: int = 2):
        self.poll_seconds = poll_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        # Exactly the batches the run will use: reading ahead past the last step would only cost input work.
        self._thread = threading.Thread(target=self._fill, args=(itertools.islice(batches, count),), daemon=True,
                                        name="batch-feeder")
        self._thread.start()

    def _fill(self, batches: Iterator[dict]) -> None:
        try:
            for batch in batches:
                self._queue.put(("batch", batch))
        except BaseException as e:  # noqa: BLE001 -- handed to the loop, which re-raises it
            self._queue.put(("error", e))
        else:
            self._queue.put(("error", StopIteration("the input pipeline ended")))

    def next(self, stop: Callable[[], bool]) -> dict | None:
        """The next batch, or None once ``stop()`` is true while waiting for it."""
        while True:
            try:
                kind, item = self._queue.get(timeout=self.poll_seconds)
            except queue.Empty:
                if stop():
                    return None
                continue
            if kind == "error":
                raise item
            return item


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from ``workdir`` when it holds a checkpoint). Returns ``{"step", "history", "state",
    "evals", "skipped", "preempted"}`` -- ``history`` is a list of ``(step, metrics)`` at the logging steps,
    ``skipped`` the steps whose non-finite update was skipped, ``preempted`` whether a SIGTERM (or the multi-host
    preemption service) stopped the run after saving.

    ``workdir`` is a local folder or a URL (``gs://bucket/run``). Raises :class:`swin_ssl.hosts.RunRefused` (live
    lock, changed run-defining config, lost checkpoints) and :class:`swin_ssl.hosts.StorageUnavailable`
    (transient read errors) with the same one-line message on every process."""
    metrics_lib.quiet_library_logs()
    parallel_lib.maybe_initialize_distributed(config.get("distributed"))
    durations = validate(config, device_count=jax.device_count(), process_count=jax.process_count())
    workdir = str(storage.as_path(workdir))
    lock = workdir_lib.WorkdirLock(workdir, float(config.resume.lock_timeout_seconds)) if hosts.is_leader() else None
    hosts.leader_decides(lock.acquire if lock else None)
    try:
        record = hosts.leader_decides(lambda: workdir_lib.check_run_config(
            workdir, config, resuming=ckpt_lib.has_checkpoints(workdir)))
        return _train(config, workdir, durations, lock, record)
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, durations: Durations,
           lock: workdir_lib.WorkdirLock | None, record_config: bool) -> dict:
    logging.info("%s training: %s steps (%s per epoch), warmup %s, %d devices, %d processes",
                 config.objective, durations.total_steps, durations.steps_per_epoch, durations.warmup_steps,
                 jax.device_count(), jax.process_count())
    program = build_program(config, durations)
    par, objective = program.parallel, program.objective
    rng = jax.random.PRNGKey(int(config.seed))
    abstract = ckpt_lib.abstract_like(jax.eval_shape(program.init, rng), par.replicated)
    # Restored before the manager exists: unreadable checkpoints are moved aside first, so the manager never
    # counts them as the latest step.
    restored = ckpt_lib.restore_latest(workdir, abstract, resume=config.resume,
                                       expect={"objective": config.objective, "model": config.model.name})
    if record_config and hosts.is_leader():
        workdir_lib.record_run_config(workdir, config)
    writer = metrics_lib.create_writer(workdir, asynchronous=True)
    manager = ckpt_lib.make_manager(workdir, every_steps=int(config.checkpoint_every_steps),
                                    keep=int(config.keep_checkpoints), asynchronous=bool(config.async_checkpointing))
    if restored is None:
        with par.context():
            state = program.init(rng)
        metrics_lib.write_hparams(writer, config)
    else:
        state = restored[0]
    start = int(jax.device_get(state.step))
    metrics_lib.log_parameter_overview(state.params, msg=f"Online parameters at step {start}")

    end = durations.total_steps
    if config.get("stop_after_steps") is not None:
        end = min(end, int(config.stop_after_steps))
    feeder = None if start >= end else BatchFeeder(data_lib.make_train_iterator(
        config, process_index=jax.process_index(), process_count=jax.process_count(), start_step=start),
        count=end - start)
    progress = metrics_lib.report_progress(durations.total_steps, writer)
    log_every, save_every = max(int(config.log_every_steps), 1), int(config.checkpoint_every_steps)
    eval_every = int(config.evals.every_steps) if config.evals.get("fn") else 0
    guard = NonFiniteGuard(config.get("on_nonfinite", "stop"), int(config.get("max_skipped_steps", 0)))
    if start >= end:
        logging.info("Nothing to train: the checkpoint is at step %d, the run ends at step %d.", start, end)
    history, evals, last_saved, step, preempted = [], [], start, start, False
    t0 = time.time()

    def save(step: int, force: bool) -> None:
        nonlocal last_saved
        guard.flush()  # never checkpoint past a step that went non-finite under "stop"
        with progress.timed("checkpoint"):
            if ckpt_lib.save(manager, step, state, _meta(config, objective, step), force=force):
                last_saved = step

    try:
        with SigtermFlag() as sigterm:
            for next_step in range(start + 1, end + 1):
                batch = feeder.next(stop=lambda: sigterm.received)
                if batch is None:  # SIGTERM while waiting for input: keep what the finished steps computed
                    preempted = True
                    break
                step = next_step
                with jax.profiler.StepTraceAnnotation("train", step_num=step), par.context():
                    state, metrics = program.step(state, par.put_batch(batch))
                guard.push(step, metrics)
                progress(step)
                if lock is not None:
                    lock.heartbeat()
                if step % log_every == 0 or step == end:
                    guard.flush()
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    values["skipped_steps"] = float(len(guard.skipped))
                    metrics_lib.write_scalars(writer, step, values)
                    history.append((step, values))
                preempted = sigterm.received or manager.reached_preemption(step)
                if step % save_every == 0 or preempted:
                    save(step, force=preempted)
                if preempted:
                    break
                if eval_every and (step % eval_every == 0 or step == end):
                    with progress.timed("eval"):
                        evals.append((step, run_evals(config, state, objective, step, workdir, writer)))
            if step != last_saved:
                save(step, force=True)
    finally:
        # Also on an exception: the save in flight (the last good state) is completed, never left half-written.
        manager.wait_until_finished()
        manager.close()
        writer.flush()
        writer.close()
    if preempted:
        logging.warning("Preempted: saved the checkpoint of step %d in %s and stopped (exit status %d); rerun the "
                        "same command to resume.", step, ckpt_lib.checkpoint_dir(workdir), EXIT_PREEMPTED)
    logging.info("Trained steps %d..%d in %.1fs", start, step, time.time() - t0)
    return {"step": step, "history": history, "state": state, "evals": evals, "skipped": list(guard.skipped),
            "preempted": preempted}

"""Reliability: kill-and-resume is bitwise exact, SIGTERM saves and exits cleanly, a non-finite step
stops (or is skipped) without a broken checkpoint, unreadable checkpoints are moved aside, bad configs fail early.

The kill/SIGTERM tests drive real ``train.py`` subprocesses; they inherit the suite's XLA flags (8 CPU devices),
so the reference run and the interrupted run execute the same compiled program.
"""
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import esvit_swin_tiny, moby_swin_tiny  # noqa: E402
from swin_ssl import checkpoint  # noqa: E402
from swin_ssl.train import loop  # noqa: E402

CONFIGS = {"moby": "configs/moby_swin_tiny.py:smoke", "esvit": "configs/esvit_swin_tiny.py:smoke"}


def _train_py(workdir, config, *flags, env=None, cwd=ROOT):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--workdir", str(workdir), *flags]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _steps(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                  if os.path.basename(p).isdigit())


def _assert_trees_identical(a, b, what):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b, what
    for i, (x, y) in enumerate(zip(flat_a, flat_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}: leaf {i}")


@pytest.mark.slow
@pytest.mark.parametrize("objective,async_save", [("moby", False), ("esvit", False), ("moby", True)])
def test_sigkill_and_restart_is_bitwise_identical(objective, async_save, finished_runs, tmp_path):
    """Uninterrupted 6 steps vs ``train.py`` SIGKILLed at step 5 (checkpoints every 3) + the same command again.

    With synchronous saves the restart resumes from step 3. With asynchronous saves the kill may land while step 3
    is still being written: then nothing complete exists (only orbax's temporary directory) and the restart begins
    from scratch -- either way the result must be the same bits."""
    straight, killed = finished_runs[objective][0], tmp_path / "killed"
    flags = [f"--config.async_checkpointing={async_save}"]
    hook = ["--config.evals.fn=tests.hooks:sigkill_at", "--config.evals.every_steps=1"]
    rc, log = _finish(_train_py(killed, CONFIGS[objective], *flags, *hook, env={"SWIN_SSL_KILL_AT": "5"}))
    assert rc == -signal.SIGKILL, log[-3000:]
    complete = _steps(killed)
    assert complete == [3] if not async_save else complete in ([], [3]), complete

    rc, log = _finish(_train_py(killed, CONFIGS[objective], *flags))
    assert rc == 0, log[-3000:]
    assert ("Restoring checkpoint of step 3" in log) == (complete == [3])
    assert not glob.glob(os.path.join(killed, "checkpoints", "*tmp*"))  # an interrupted save leaves nothing behind
    want, want_meta = checkpoint.restore_raw(str(straight))
    got, got_meta = checkpoint.restore_raw(str(killed))
    assert want_meta["step"] == got_meta["step"] == 6
    # params, optimizer moments and count, EMA target, BN statistics, queues + pointer / centers, RNG, step
    _assert_trees_identical(got, want, f"{objective} state after kill + resume")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_143(tmp_path):
    """A real SIGTERM mid-run: checkpoint of the step in progress (none other is due), exit status 143 (not 0, so
    a restart loop or a scheduler's OnFailure policy reruns it), a message; meanwhile a second ``train.py`` on the
    same workdir is refused (exit 2, one line) and changes nothing; the same command resumes from that step."""
    flags = ["--config.total_steps=100000", "--config.checkpoint_every_steps=100000",
             "--config.evals.fn=tests.hooks:mark_alive", "--config.evals.every_steps=1"]
    proc = _train_py(tmp_path, CONFIGS["moby"], *flags)
    alive = tmp_path / "alive"
    deadline = time.time() + 500
    while not alive.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert alive.exists(), _finish(proc)[1][-3000:]

    rc, log = _finish(_train_py(tmp_path, CONFIGS["moby"], *flags))
    assert rc == 2, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"this workdir is in use by pid {proc.pid}" in errors[0], log[-3000:]
    assert proc.poll() is None  # the first run goes on

    proc.send_signal(signal.SIGTERM)
    rc, log = _finish(proc)
    assert rc == 143, log[-3000:]
    saved = _steps(tmp_path)
    assert len(saved) == 1 and saved[0] >= int(alive.read_text()), saved
    assert f"Preempted: saved the checkpoint of step {saved[0]}" in log
    assert not (tmp_path / "lock.json").exists()  # released on the way out

    rc, log = _finish(_train_py(tmp_path, CONFIGS["moby"], *flags[:2], f"--config.stop_after_steps={saved[0] + 2}"))
    assert rc == 0, log[-3000:]
    assert f"Restoring checkpoint of step {saved[0]}" in log
    assert _steps(tmp_path)[-1] == saved[0] + 2


def sigterm_self_at_2(*, config, params, step, workdir):
    """``config.evals`` hook: the scheduler's SIGTERM arrives after step 2."""
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return {}


@pytest.mark.slow
def test_sigterm_while_the_input_is_stalled_still_saves_and_stops(tmp_path, monkeypatch):
    """The input hangs before step 3 (a file read that never returns) and SIGTERM arrives: the run still ends
    with the checkpoint of step 2 instead of waiting for a batch that never comes."""
    make = loop.data_lib.make_train_iterator
    released = threading.Event()

    def stalling_iterator(config, *, start_step, **kwargs):
        for step, batch in enumerate(make(config, start_step=start_step, **kwargs), start=start_step + 1):
            if step == 3:
                released.wait(timeout=600)  # a hang; the loop must not wait for it
            yield batch

    monkeypatch.setattr(loop.data_lib, "make_train_iterator", stalling_iterator)
    config = moby_swin_tiny.get_config("smoke")
    config.checkpoint_every_steps = 100
    config.evals.fn, config.evals.every_steps = f"{__name__}:sigterm_self_at_2", 1
    try:
        result = loop.train_and_evaluate(config, str(tmp_path))
        stalled = not released.is_set()
    finally:
        released.set()
    assert stalled  # the run ended while the input was still hanging
    assert result["preempted"] and result["step"] == 2
    assert _steps(str(tmp_path)) == [2]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Each smoke preset trained to step 6 in this process (checkpoints 3 and 6): the uninterrupted references.
    The subprocesses run the same compiled program (same XLA flags), so their bits must agree with these."""
    runs = {}
    for objective, module in (("moby", moby_swin_tiny), ("esvit", esvit_swin_tiny)):
        workdir = str(tmp_path_factory.mktemp(f"finished_{objective}"))
        result = loop.train_and_evaluate(module.get_config("smoke"), workdir)
        assert _steps(workdir) == [3, 6]
        runs[objective] = workdir, jax.device_get(result["state"])
    return runs


@pytest.fixture
def finished_run(finished_runs):
    return finished_runs["moby"]


# --- NaN/Inf guard (in process) ------------------------------------------------------------------------------

def _poisoned_iterator(bad_step):
    """The real smoke iterator with NaN images in the batch of ``bad_step`` (1-based, as the loop counts)."""
    make = loop.data_lib.make_train_iterator

    def iterator(config, *, start_step, **kwargs):
        for step, batch in enumerate(make(config, start_step=start_step, **kwargs), start=start_step + 1):
            if step == bad_step:
                batch = {k: np.full_like(v, np.nan) for k, v in batch.items()}
            yield batch
    return iterator


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(loop.data_lib, "make_train_iterator", _poisoned_iterator(5))
    config = moby_swin_tiny.get_config("smoke")
    with pytest.raises(FloatingPointError, match=r"non-finite loss=nan at step 5 .*no checkpoint after step 4"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert _steps(str(tmp_path)) == [3]  # neither step 5 nor the final step 6 was saved
    state, _ = checkpoint.restore_raw(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))


@pytest.mark.slow
def test_nonfinite_step_can_be_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(loop.data_lib, "make_train_iterator", _poisoned_iterator(5))
    config = moby_swin_tiny.get_config("smoke")
    config.on_nonfinite = "skip"
    result = loop.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 6 and result["skipped"] == [5]
    assert dict(result["history"])[6]["skipped_steps"] == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(result["state"].params)))

    config.max_skipped_steps = 0  # a fresh run that may not skip anything stops at the bad step
    with pytest.raises(FloatingPointError, match="at step 5 after 0 skipped steps"):
        loop.train_and_evaluate(config, str(tmp_path / "no_skips"))


def _program_state_batch(config, durations):
    """The compiled program of ``config``, its initial state and the first host batch of the smoke data."""
    program = loop.build_program(config, durations)
    with program.parallel.context():
        state = program.init(jax.random.PRNGKey(0))
    batch = next(loop.data_lib.make_train_iterator(config, process_index=0, process_count=1, start_step=0))
    return program, state, batch


@pytest.mark.slow
def test_nonfinite_step_leaves_the_state_untouched(tmp_path):
    """The compiled step itself: a NaN batch changes nothing but the step counter (params, Adam moments and count,
    EMA target, BN statistics, queues and pointer)."""
    config = moby_swin_tiny.get_config("smoke")
    program, state, batch = _program_state_batch(config, loop.validate(config, device_count=jax.device_count()))
    before = jax.device_get(state)
    batch = {k: np.where(np.arange(v.shape[0])[:, None, None, None] == 3, np.inf, v) for k, v in batch.items()}
    with program.parallel.context():
        after, metrics = program.step(state, program.parallel.put_batch(batch))
    after = jax.device_get(after)
    assert float(metrics["finite"]) == 0.0 and not math.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(before.step) + 1
    _assert_trees_identical(after.replace(step=before.step), before, "state after a non-finite step")


@pytest.mark.slow
def test_nonfinite_guard_is_one_flag_in_the_compiled_step():
    """The guard's flag (every value of the new state finite) is computed once: the compiled step holds a few ANDs
    per state leaf, not the AND over all leaves copied into each leaf's select (a program that grows with the
    square of the number of leaves and compiles, and loads from the compilation cache, several times slower)."""
    config = moby_swin_tiny.get_config("smoke")
    program, state, batch = _program_state_batch(config, loop.validate(config, device_count=jax.device_count()))
    with program.parallel.context():
        hlo = program.step.lower(state, program.parallel.put_batch(batch)).compile().as_text()
    leaves = sum(np.issubdtype(x.dtype, np.floating) for x in jax.tree.leaves(state))
    ands = len(re.findall(r" and\(", hlo))
    assert leaves > 100 and ands < 4 * leaves, (ands, leaves)


# --- checkpoint integrity -------------------------------------------------------------------------------------

def _corrupt(workdir, step):
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(8)


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, caplog):
    source, final_state = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    _corrupt(workdir, 6)
    # A save that a kill interrupted: orbax's temporary directory, never renamed to "9".
    os.makedirs(os.path.join(workdir, "checkpoints", "9.orbax-checkpoint-tmp-1700000000", "state"))
    with caplog.at_level("WARNING"):
        result = loop.train_and_evaluate(moby_swin_tiny.get_config("smoke"), workdir)
    assert any("step 6 is unreadable" in r.getMessage() for r in caplog.records)
    assert len(glob.glob(os.path.join(workdir, "unreadable_checkpoints", "6-*"))) == 1  # moved aside, not deleted
    assert result["history"][0][0] == 4  # resumed from step 3
    _assert_trees_identical(jax.device_get(result["state"]), final_state, "state retrained from step 3")
    assert _steps(workdir) == [3, 6]
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))  # the stale temporary save is cleaned up


@pytest.mark.slow
def test_all_checkpoints_unreadable_never_restarts_from_zero_silently(finished_run, tmp_path):
    """Every checkpoint truncated: the first rerun moves them aside and refuses; the second rerun (what a scheduler's
    auto-restart does) finds an empty checkpoint folder and still refuses, saying where the checkpoints went; only
    ``resume.allow_fresh_start`` trains from step 0."""
    source, final_state = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    _corrupt(workdir, 6)
    _corrupt(workdir, 3)
    config = moby_swin_tiny.get_config("smoke")
    with pytest.raises(RuntimeError, match=r"no readable checkpoint in .*checkpoints \(step 6: .*; step 3: .*\), "
                                           r"although this run has had checkpoints") as first:
        loop.train_and_evaluate(config, workdir)
    assert "\n" not in str(first.value)
    assert len(glob.glob(os.path.join(workdir, "unreadable_checkpoints", "*"))) == 2
    with pytest.raises(RuntimeError, match=r"no readable checkpoint .*\(none left\).*unreadable_checkpoints.*"
                                           r"--config.resume.allow_fresh_start=True"):
        loop.train_and_evaluate(config, workdir)
    assert _steps(workdir) == []
    config.resume.allow_fresh_start = True
    result = loop.train_and_evaluate(config, workdir)
    assert result["history"][0][0] == 2  # from step 0
    _assert_trees_identical(jax.device_get(result["state"]), final_state, "state trained afresh")


@pytest.mark.slow
def test_transient_read_error_is_retried_then_stops_without_moving_anything(finished_run, tmp_path, monkeypatch):
    """A stale NFS handle while reading the newest checkpoint is not corruption: retried, then the run stops with
    StorageUnavailable (train.py: exit 75) and every checkpoint stays where it is."""
    import errno
    source, _ = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    calls = []

    def stale(path):
        calls.append(path)
        raise OSError(errno.ESTALE, "Stale file handle", path)

    monkeypatch.setattr(checkpoint, "_read_meta", stale)
    config = moby_swin_tiny.get_config("smoke")
    config.resume.read_retries, config.resume.retry_seconds = 2, 0.01
    with pytest.raises(checkpoint.StorageUnavailable, match=r"cannot read .*checkpoints/6 now \(OSError: .*Stale "
                                                            r"file handle.*after 2 retries; nothing was moved"):
        loop.train_and_evaluate(config, workdir)
    assert len(calls) == 3  # the first read and two retries
    assert _steps(workdir) == [3, 6] and not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))
    assert checkpoint.is_transient(OSError(errno.EIO, "Input/output error"))
    assert not checkpoint.is_transient(ValueError("DATA_LOSS: truncated"))
    assert not checkpoint.is_transient(FileNotFoundError("state/manifest.ocdbt"))


@pytest.mark.slow
def test_checkpoint_of_another_run_is_refused_not_moved(finished_run, tmp_path):
    """Another run's configuration is refused by the recorded run config; with the override the checkpoint itself
    is still refused (other objective, other shapes). Nothing is moved either way."""
    source, _ = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    config = moby_swin_tiny.get_config("smoke")
    config.moby.proj_dim = 16  # same model name, other head shapes
    with pytest.raises(loop.hosts.RunRefused, match=r"another configuration \(moby.proj_dim: \d+ -> 16\)"):
        loop.train_and_evaluate(config, workdir)
    config.resume.allow_config_change = True
    with pytest.raises(ValueError, match="does not match the configured train state"):
        loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "run_config.json")) as f:
        assert json.load(f)["moby.proj_dim"] != 16  # a refused restore leaves the recorded configuration alone
    config = esvit_swin_tiny.get_config("smoke")
    with pytest.raises(loop.hosts.RunRefused, match=r'objective: "moby" -> "esvit"'):
        loop.train_and_evaluate(config, workdir)
    config.resume.allow_config_change = True
    with pytest.raises(ValueError, match="objective='moby' but the config has 'esvit'"):
        loop.train_and_evaluate(config, workdir)
    assert _steps(workdir) == [3, 6] and not os.path.exists(os.path.join(workdir, "unreadable_checkpoints"))


# --- resuming with another configuration ------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_with_another_batch_size_is_refused_before_compiling(finished_run, tmp_path, monkeypatch):
    """The data position, epoch-based schedules and the queue pointer all depend on the global batch: a rerun with
    another one is refused with one line naming the key and both values, before anything is compiled."""
    source, _ = finished_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)

    def no_build(*args, **kwargs):
        raise AssertionError("the program was built before the configuration was compared")

    monkeypatch.setattr(loop, "build_program", no_build)
    config = moby_swin_tiny.get_config("smoke")
    config.batch_size, config.seed, config.log_every_steps = 32, 1, 1  # log_every_steps may change
    with pytest.raises(loop.hosts.RunRefused) as info:
        loop.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "batch_size: 16 -> 32; seed: 0 -> 1)" in message and "\n" not in message, message
    assert "log_every_steps" not in message and "--config.resume.allow_config_change=True" in message
    config.resume.allow_config_change = True  # the override gets past the check (and then builds the program)
    with pytest.raises(AssertionError, match="the program was built"):
        loop.train_and_evaluate(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "lock.json"))  # released after each attempt


@pytest.mark.slow
def test_update_that_makes_the_state_nonfinite_is_never_applied(tmp_path, monkeypatch):
    """Loss and gradients finite, the update not: Adam with eps=0 divides 0 by 0 for parameters whose gradient is
    exactly zero (biases before BatchNorm). Validation refuses eps=0 up front; this is the second line of defence,
    for whatever else breaks an update: the step keeps the old state, and the loop stops naming the cause."""
    config = moby_swin_tiny.get_config("smoke")
    durations = loop.validate(config, device_count=jax.device_count())
    config.optim.eps = 0.0
    program, state, batch = _program_state_batch(config, durations)
    before = jax.device_get(state)
    with program.parallel.context():
        after, metrics = program.step(state, program.parallel.put_batch(batch))
    assert float(metrics["finite"]) == 0.0
    assert math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))
    _assert_trees_identical(jax.device_get(after).replace(step=before.step), before, "state after a bad update")

    monkeypatch.setattr(loop, "validate", lambda *args, **kwargs: durations)  # let eps=0 through to the step
    with pytest.raises(FloatingPointError, match=r"non-finite updated state \(parameters, optimizer moments"):
        loop.train_and_evaluate(config, str(tmp_path))
    assert _steps(str(tmp_path)) == []  # nothing was saved


def test_workdir_lock_tells_live_runs_from_stale_ones(tmp_path):
    from swin_ssl.train import workdir as workdir_lib

    def held_by(**info):
        (tmp_path / "lock.json").write_text(json.dumps({"token": "other", "started": time.time(), **info}))

    lock = workdir_lib.WorkdirLock(str(tmp_path), timeout=60)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held_by(host=socket.gethostname(), pid=int(dead.stdout), heartbeat=time.time())
    lock.acquire()  # same host, process gone: stale, taken over
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == lock.info["token"]
    lock.release()
    assert not (tmp_path / "lock.json").exists()

    held_by(host=socket.gethostname(), pid=os.getppid(), heartbeat=0)  # same host, process alive: live
    with pytest.raises(loop.hosts.RunRefused, match=r"in use by pid \d+ on .*process running"):
        lock.acquire()
    held_by(host="other-vm", pid=1, heartbeat=time.time() - 30)  # another host, recent heartbeat: live
    with pytest.raises(loop.hosts.RunRefused, match="other-vm.*last heartbeat 3\\d s ago"):
        lock.acquire()
    held_by(host="other-vm", pid=1, heartbeat=time.time() - 61)  # another host, silent past the timeout: stale
    lock.acquire()
    lock.release()


# --- config validation before compiling -----------------------------------------------------------------------

def _with_extra_key(config, block, key, value):
    config = config.copy_and_resolve_references()
    (config[block] if block else config)[key] = value
    return config


@pytest.mark.parametrize("make,key", [
    (lambda: _with_extra_key(moby_swin_tiny.get_config("smoke"), "optim", "weight_decy", 0.1),
     "config.optim.weight_decy: unknown key; did you mean optim.weight_decay?"),
    (lambda: _with_extra_key(moby_swin_tiny.get_config("smoke"), "", "totl_steps", 9), "config.totl_steps"),
    (lambda: _with_extra_key(moby_swin_tiny.get_config("smoke"), "data", "crop_scal", (0.2, 1.0)),
     "config.data.crop_scal"),
    (lambda: _override(esvit_swin_tiny.get_config("smoke"), {"data.local_size": 18}), "config.data.local_size=18"),
    (lambda: _override(esvit_swin_tiny.get_config("smoke"), {"data.local_size": 64}), "config.data.local_size=64"),
    (lambda: _override(moby_swin_tiny.get_config("smoke"), {"data.crop_scale": (0.2, 1.5)}), "config.data.crop_scale"),
    (lambda: _override(esvit_swin_tiny.get_config("smoke"), {"optim.freeze_steps": 7}), "config.optim.freeze_steps=7"),
    (lambda: _override(esvit_swin_tiny.get_config("smoke"), {"dino.warmup_teacher_temp_epochs": 3}),
     "config.dino.warmup_teacher_temp_epochs=3"),
    (lambda: _override(moby_swin_tiny.get_config("smoke"), {"keep_checkpoints": 1}), "config.keep_checkpoints=1"),
    (lambda: _override(moby_swin_tiny.get_config("smoke"), {"on_nonfinite": "ignore"}), "config.on_nonfinite"),
])
def test_more_bad_configs_fail_before_compiling(make, key, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the program was built before the config was validated")

    monkeypatch.setattr(loop, "build_program", no_build)
    with pytest.raises(ValueError) as info:
        loop.train_and_evaluate(make(), str(tmp_path))
    message = str(info.value)
    assert key in message and "\n" not in message, message


def _override(config, overrides):
    config.update_from_flattened_dict(overrides)
    return config

"""Several real ``train.py`` processes on localhost (``jax.distributed``, gloo CPU collectives, one device each)
sharing one workdir, as the hosts of a pod do: kill-and-resume is bitwise, SIGTERM to one process stops all of
them at one step with one checkpoint, and a read error on one host gives the same outcome on every host.

The launches run the same programs; the suite's persistent compilation cache (``tests/conftest.py``, inherited
through the environment) keeps process 0 from compiling each one again (it changes no numbers: the cached
executable is the compiled one).
"""
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from swin_ssl import checkpoint
from tests.test_reliability import _assert_trees_identical, _steps
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config", "configs/moby_swin_tiny.py:smoke", "--config.async_checkpointing=False"]


HOSTS = 2  # processes of the straight run and of every launch that does not say otherwise


pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n, workdir, *flags, faults=None, extra_env=None):
    """``n`` processes of ``train.py`` (or of ``tests/storage_faults.py`` wrapping it) on one coordinator."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           **(extra_env or {})}
    procs = []
    for i in range(n):
        script = ["train.py"] if faults is None else ["tests/storage_faults.py", *faults, "--"]
        cmd = [sys.executable, *script, *SMOKE, "--workdir", str(workdir), *flags,
               "--config.distributed.initialize=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               f"--config.distributed.num_processes={n}", f"--config.distributed.process_id={i}",
               "--config.distributed.cpu_collectives=gloo"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _wait(procs, timeout=900):
    """``[(returncode, log)]``; kills every process if any is still running after ``timeout`` (a deadlock)."""
    deadline, results = time.time() + timeout, []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"process {procs.index(proc)} still running after {timeout} s (deadlock?)")
        results.append((proc.returncode, out))
    return results


def _error_lines(log):
    return [line for line in log.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """``HOSTS`` processes train the smoke preset to step 6 in one go (checkpoints 3 and 6)."""
    workdir = tmp_path_factory.mktemp("straight")
    for rc, log in _wait(_launch(HOSTS, workdir)):
        assert rc == 0, log[-3000:]
    assert _steps(workdir) == [3, 6]
    return workdir


def test_kill_and_resume_is_bitwise(straight, tmp_path):
    hook = ["--config.evals.fn=tests.hooks:sigkill_at", "--config.evals.every_steps=1"]
    results = _wait(_launch(HOSTS, tmp_path, *hook, extra_env={"SWIN_SSL_KILL_AT": "5"}))
    assert all(rc == -signal.SIGKILL for rc, _ in results), [log[-2000:] for _, log in results]
    assert _steps(tmp_path) == [3]
    for rc, log in _wait(_launch(HOSTS, tmp_path)):
        assert rc == 0 and "Restoring checkpoint of step 3" in log, log[-3000:]
    want, _ = checkpoint.restore_raw(str(straight))
    got, meta = checkpoint.restore_raw(str(tmp_path))
    assert meta["step"] == 6
    _assert_trees_identical(got, want, f"{HOSTS}-process state after kill + resume")


def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
    flags = ["--config.total_steps=100000", "--config.checkpoint_every_steps=100000",
             "--config.evals.fn=tests.hooks:mark_alive", "--config.evals.every_steps=1"]
    procs = _launch(HOSTS, tmp_path, *flags)
    deadline = time.time() + 600
    while not (tmp_path / "alive").exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.5)
    assert (tmp_path / "alive").exists(), _wait(procs)[0][1][-3000:]
    procs[-1].send_signal(signal.SIGTERM)  # the last host only, as when one VM of a pod is preempted
    results = _wait(procs)
    assert [rc for rc, _ in results] == [143] * HOSTS, [log[-2000:] for _, log in results]
    saved = _steps(tmp_path)
    assert len(saved) == 1, saved
    for _, log in results:
        assert f"Preempted: saved the checkpoint of step {saved[0]}" in log


def _copy(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    return workdir


# Also read by 4 processes (several hosts besides the leader; the job restarted on a larger slice): the checkpoints
# are the 2-process run's, since a 4-process run of its own costs minutes on a 2-core machine.
@pytest.mark.parametrize("n", [HOSTS, 4], ids=lambda n: f"{n}proc")
def test_transient_read_error_on_one_host_stops_every_host_alike(straight, n, tmp_path):
    workdir = _copy(straight, tmp_path)
    faults = ["transient", str(n - 1), "6"]
    results = _wait(_launch(n, workdir, "--config.resume.retry_seconds=0.1", faults=faults))
    assert [rc for rc, _ in results] == [75] * n, [log[-2000:] for _, log in results]
    errors = [_error_lines(log) for _, log in results]
    assert all(len(e) == 1 for e in errors) and len({e[0] for e in errors}) == 1, errors  # one line, the same
    assert f"cannot read {workdir}/checkpoints/6 now (process [{n - 1}]" in errors[0][0]
    assert _steps(workdir) == [3, 6] and not (workdir / "unreadable_checkpoints").exists()  # nothing moved


def test_damaged_checkpoint_on_one_host_makes_every_host_fall_back(straight, tmp_path):
    workdir = _copy(straight, tmp_path)
    results = _wait(_launch(HOSTS, workdir, faults=["damaged", str(HOSTS - 1), "6"]))
    for rc, log in results:
        assert rc == 0 and "Restoring checkpoint of step 3" in log, log[-3000:]
    assert len(glob.glob(str(workdir / "unreadable_checkpoints" / "6-*"))) == 1  # moved aside once, by process 0
    want, _ = checkpoint.restore_raw(str(straight))
    got, meta = checkpoint.restore_raw(str(workdir))
    assert meta["step"] == 6
    _assert_trees_identical(got, want, f"{HOSTS}-process state retrained from step 3")


TFDS_WORKER = r"""
import json, os, sys
os.environ.update(JAX_PLATFORMS="cpu")
import jax
rank, port, data_dir, manual_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank)
import numpy as np
import tensorflow_datasets as tfds


class TinyManual(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "any folder"

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
        open(os.path.join(dl_manager.manual_dir, f"prepared_by_{jax.process_index()}"), "w").close()
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(10):
            yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 2}


from swin_ssl.data import sources
source = sources.tfds_source("tiny_manual", "train", data_dir, manual_dir, jax.process_index(), 2)
print("RESULT " + json.dumps(list(source.host_counts)))
"""


def test_only_process_0_prepares_a_tfds_data_set(tmp_path):
    """Two hosts start on an unprepared TFDS data set with manual downloads: process 0 prepares it once, process 1
    waits and then reads what it wrote (both see the same 5 + 5 examples)."""
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "download.tar").write_text("the manual download")
    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    procs = [subprocess.Popen([sys.executable, "-c", TFDS_WORKER, str(rank), port, str(tmp_path / "tfds"),
                               str(manual)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    for rc, log in _wait(procs, timeout=600):
        assert rc == 0, log[-3000:]
        assert "RESULT [5, 5]" in log, log[-3000:]
    assert sorted(os.listdir(manual)) == ["download.tar", "prepared_by_0"]

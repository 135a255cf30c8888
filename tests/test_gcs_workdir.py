"""Remote workdirs: ``train.py --workdir gs://bucket/run`` against a local Cloud Storage emulator.

A MoBY smoke run on ``gs://`` is SIGKILLed at step 5 and rerun: it resumes from the step-3 checkpoint in the bucket
and ends bitwise equal to an uninterrupted run (local workdir). ``evaluate.py`` (k-NN) then reads that workdir and
writes ``results.json`` + TensorBoard events next to it. Checkpoints, events and results are objects in the bucket;
nothing is written locally (the processes' working directory stays empty, no ``gs:`` folder appears anywhere).

The local reference run and the run that gets killed start together; the rerun loads their executables from the
suite's JAX compilation cache (``tests/conftest.py``) instead of compiling again.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from test_reliability import CONFIGS, ROOT, _assert_trees_identical, _finish, _train_py  # puts ROOT on sys.path

from swin_ssl import checkpoint  # noqa: E402

CONFIG = os.path.join(ROOT, CONFIGS["moby"])  # absolute: the runs on gs:// start in an empty directory
RUN = "gs://bucket/run"
SYNC = "--config.async_checkpointing=False"  # the kill at step 5 then always finds step 3 complete
KILL_HOOK = ["--config.evals.fn=tests.hooks:sigkill_at", "--config.evals.every_steps=1"]


def _local_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, name), root)
                  for d, dirs, files in os.walk(root) for name in dirs + files)


def _gcs_steps(gcs) -> set[int]:
    """Steps that have checkpoint objects under ``gs://bucket/run/checkpoints/``."""
    tops = {name.split("/")[2] for name in gcs.objects("run/checkpoints/")}
    return {int(top) for top in tops if top.isdigit()}


@pytest.mark.slow
def test_gs_workdir_train_kill_resume_and_evaluate(gcs, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # The uninterrupted local reference runs alongside the run that gets killed (each on its own core).
    straight = tmp_path / "straight"
    straight_run = _train_py(straight, CONFIG, SYNC)
    rc, log = _finish(_train_py(RUN, CONFIG, SYNC, *KILL_HOOK, env={**gcs.env, "SWIN_SSL_KILL_AT": "5"}, cwd=cwd))
    straight_rc, straight_log = _finish(straight_run)
    assert straight_rc == 0, straight_log[-3000:]
    assert rc == -signal.SIGKILL, log[-3000:]
    assert _local_files(cwd) == [], "the run on gs:// wrote locally"
    assert _gcs_steps(gcs) == {3}, gcs.objects("run/")

    rc, log = _finish(_train_py(RUN, CONFIG, SYNC, env=gcs.env, cwd=cwd))
    assert rc == 0, log[-3000:]
    assert "Restoring checkpoint of step 3" in log, log[-3000:]
    assert _gcs_steps(gcs) == {3, 6}, gcs.objects("run/checkpoints/")
    with gcs.applied():
        got, got_meta = checkpoint.restore_raw(RUN)
    want, want_meta = checkpoint.restore_raw(str(straight))
    assert want_meta["step"] == got_meta["step"] == 6
    _assert_trees_identical(got, want, "state on gs:// after kill + resume vs a straight local run")

    evaluate = subprocess.run(
        [sys.executable, os.path.join(ROOT, "evaluate.py"), "--config", os.path.join(ROOT, "configs/knn.py:smoke"),
         "--config.init=checkpoint", f"--config.checkpoint_dir={RUN}", "--workdir", f"{RUN}/knn"],
        cwd=cwd, env={**os.environ, **gcs.env}, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, (evaluate.stdout + evaluate.stderr)[-3000:]
    saved = json.loads(gcs.read("run/knn/results.json"))
    assert saved["evaluated"]["source"] == RUN and saved["evaluated"]["checkpoint_step"] == 6, saved["evaluated"]
    assert saved["evaluated"]["objective"] == "moby" and "knn/top1_k20" in saved["metrics"], saved

    objects = gcs.objects("run/")
    for folder in ("run", "run/knn"):  # training's and evaluation's TensorBoard event files
        assert any(os.path.dirname(name) == folder and os.path.basename(name).startswith("events.out.tfevents.")
                   for name in objects), (folder, objects)
    assert _local_files(cwd) == [], "a run on gs:// wrote locally"
    assert not [path for path in _local_files(tmp_path) if "gs:" in path]

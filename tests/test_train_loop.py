"""End to end: the smoke preset through ``train_and_evaluate``, resume, config validation, train.py flags."""
import glob
import math
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import moby_deit_small, moby_swin_tiny  # noqa: E402
from tests.jit_helpers import count_compilations  # noqa: E402
from swin_ssl.train import loop  # noqa: E402
from swin_ssl.train import validate as validate_lib  # noqa: E402
from tests.xla_env import xla_flags  # noqa: E402


def smoke_config(**overrides):
    c = moby_swin_tiny.get_config("smoke")
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The smoke preset, 6 steps in one go (shared by several tests; compiled once per test session)."""
    workdir = str(tmp_path_factory.mktemp("smoke_full"))
    start = time.time()
    with count_compilations("train_step") as compiles:
        result = loop.train_and_evaluate(smoke_config(), workdir)
    result["seconds"] = time.time() - start
    result["step_compiles"] = len(compiles)
    result["workdir"] = workdir
    return result


@pytest.mark.slow
def test_smoke_runs_end_to_end(uninterrupted):
    history = dict(uninterrupted["history"])
    assert uninterrupted["step"] == 6 and sorted(history) == [2, 4, 6]
    for metrics in history.values():
        for key in ("loss", "lr", "momentum", "pos_logit", "neg_logit", "key_std", "grad_norm"):
            assert math.isfinite(metrics[key]), key
    # The momentum follows the schedule over the 6 steps (logged values are those of steps 1, 3, 5).
    np.testing.assert_allclose(history[6]["momentum"], 1 - 0.01 * (math.cos(math.pi * 5 / 6) + 1) / 2, rtol=1e-6)
    # Checkpoints every 3 steps, the final one, keep 2; TensorBoard events in the workdir.
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(uninterrupted["workdir"], "checkpoints", "*"))
                   if os.path.basename(p).isdigit())
    assert steps == [3, 6]
    assert glob.glob(os.path.join(uninterrupted["workdir"], "events.out.tfevents.*"))
    print(f"smoke preset: {uninterrupted['seconds']:.1f}s for 6 steps incl. compilation")


@pytest.mark.slow
def test_train_step_compiles_once(uninterrupted):
    assert uninterrupted["step_compiles"] == 1


@pytest.mark.slow
def test_resume_continues_exactly(uninterrupted, tmp_path):
    """Stop at step 3, restart from the checkpoint: same momentum, queues, params as the uninterrupted run."""
    workdir = str(tmp_path)
    first = loop.train_and_evaluate(smoke_config(stop_after_steps=3), workdir)
    assert first["step"] == 3
    with count_compilations("train_step") as compiles:
        second = loop.train_and_evaluate(smoke_config(), workdir)
    resumed_history = dict(second["history"])
    assert sorted(resumed_history) == [4, 6]  # the second run started at step 3
    full = dict(uninterrupted["history"])
    # Momentum at step 6 (computed from state.step) equals the uninterrupted run's: no restart at 0.99.
    assert resumed_history[6]["momentum"] == full[6]["momentum"]
    np.testing.assert_allclose(resumed_history[6]["loss"], full[6]["loss"], rtol=1e-6)
    a, b = jax.device_get(second["state"]), jax.device_get(uninterrupted["state"])
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert len(compiles) == 1  # the restored state has the placement the step was compiled for


@pytest.mark.slow
def test_checkpoint_gives_evaluators_the_backbones(uninterrupted):
    from swin_ssl.evaluators.loading import load_network
    state = jax.device_get(uninterrupted["state"])
    model, default, meta = load_network(uninterrupted["workdir"])
    assert meta["step"] == 6 and meta["model"] == "swin_test" and model.img_size == 32
    assert meta["eval_backbone"] == meta["network"] == "online"
    for network, want in (("online", state.params["backbone"]), ("target", state.target_params["backbone"])):
        got = load_network(uninterrupted["workdir"], network)[1]
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(state.params["backbone"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_deit_smoke_preset_trains(tmp_path):
    c = moby_deit_small.get_config("smoke")
    c.stop_after_steps = 2
    result = loop.train_and_evaluate(c, str(tmp_path))
    assert result["step"] == 2 and math.isfinite(result["history"][-1][1]["loss"])


@pytest.mark.parametrize("overrides,key", [
    ({"batch_size": 12, "moby.queue_size": 48}, "config.batch_size=12"),           # 12 % 8 devices
    ({"moby.queue_size": 40}, "config.moby.queue_size=40"),                        # 40 % 16
    ({"data.image_size": 36}, "config.data.image_size=36"),                        # 9x9 tokens: odd for merging
    ({"data.image_size": 40}, "config.data.image_size=40"),                        # 10x10 tokens, window 4
    ({"data.name": "image_folder", "data.data_dir": "/nonexistent/imagenet"}, "config.data.data_dir="),
    ({"data.name": "fashion_mnist", "data.data_dir": ROOT}, "config.data.data_dir="),  # exists, lacks the files
    ({"model.name": "swin_tinny"}, "config.model.name='swin_tinny'"),
    ({"total_steps": 0, "total_epochs": 0.0}, "config.total_steps"),
])
def test_bad_configs_fail_before_compiling(overrides, key, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the program was built before the config was validated")

    monkeypatch.setattr(loop, "build_program", no_build)
    with pytest.raises(ValueError) as info:
        loop.train_and_evaluate(smoke_config(**overrides), str(tmp_path))
    message = str(info.value)
    assert key in message and "\n" not in message, message


def _parse_flags(*args, config_file="moby_swin_tiny.py:smoke"):
    """train.py's flag definition (config_flags, lock_config=True) on a private FlagValues."""
    from absl import flags
    from ml_collections import config_flags
    values = flags.FlagValues()
    argv = ["train.py", "--config", f"{ROOT}/configs/{config_file}", *args]
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_config_flags_override_and_reject_misspelt_keys():
    config = _parse_flags("--config.batch_size=32", "--config.moby.temperature=0.1", "--config.total_steps=9")
    assert (config.batch_size, config.moby.temperature, config.total_steps) == (32, 0.1, 9)
    with pytest.raises(Exception, match="batch_sise"):
        _parse_flags("--config.batch_sise=8")
    with open(os.path.join(ROOT, "train.py")) as f:  # train.py defines its flag exactly like this
        assert 'config_flags.DEFINE_config_file("config", None, "Training config file[:preset].", lock_config=True)' in f.read()


@pytest.mark.parametrize("config_file", ["moby_swin_tiny.py:smoke", "esvit_swin_tiny.py:smoke"])
def test_remat_flag_reaches_every_backbone(config_file):
    """``--config.model.remat=True`` (the README's memory option) parses on the locked config and builds
    rematerialised online/target (student/teacher) backbones; the default builds plain ones."""
    from swin_ssl.objectives import dino, moby
    build = moby.build_networks if config_file.startswith("moby") else dino.build_networks
    for flag, expected in (([], False), (["--config.model.remat=True"], True)):
        config = _parse_flags(*flag, config_file=config_file)
        validate_lib.validate(config, device_count=8)
        backbones = build(config)[:2]
        assert [b.remat for b in backbones] == [expected, expected]


def test_synthetic_shards_make_up_the_global_batch():
    from swin_ssl.train import data
    cfg = smoke_config().data
    whole = next(data.synthetic_iterator(cfg, global_batch=16, process_index=0, process_count=1, seed=0, start_step=5))
    parts = [next(data.synthetic_iterator(cfg, global_batch=16, process_index=i, process_count=2, seed=0,
                                          start_step=5)) for i in range(2)]
    for view in ("view1", "view2"):
        assert parts[0][view].shape == (8, 32, 32, 3)
        np.testing.assert_array_equal(np.concatenate([p[view] for p in parts]), whole[view])
    assert not np.allclose(whole["view1"], whole["view2"])  # two noisy views of one image


def test_presets_resolve(fmnist_stub_dir):
    for module in (moby_swin_tiny, moby_deit_small):
        for preset in module.PRESETS:
            c = module.get_config(preset)
            assert c.objective == "moby"
            if c.data.name == "fashion_mnist":
                c.data.data_dir = fmnist_stub_dir
            d = validate_lib.validate(c, device_count=8)
            assert d.total_steps > d.warmup_steps >= 0, preset
    paper = moby_swin_tiny.get_config("paper300")
    assert (paper.batch_size, paper.total_epochs, paper.warmup_epochs) == (512, 300, 5)
    assert (paper.moby.queue_size, paper.moby.temperature, paper.optim.clip_norm) == (4096, 0.2, 5.0)
    assert moby_swin_tiny.get_config("paper100").total_epochs == 100
    with pytest.raises(ValueError, match="unknown config preset"):
        moby_swin_tiny.get_config("papr")


WORKER = r"""
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
from configs import moby_swin_tiny  # the worker runs in the repository root (``python -c``: cwd first on the path)
from swin_ssl.train import loop

process_id = int(sys.argv[1])
shapes = []
make_iterator = loop.data_lib.make_train_iterator

def recording_iterator(*args, **kwargs):  # record what this process actually reads
    for batch in make_iterator(*args, **kwargs):
        shapes.append(batch["view1"].shape[0])
        yield batch

loop.data_lib.make_train_iterator = recording_iterator
c = moby_swin_tiny.get_config("smoke")
c.distributed.update(dict(initialize=True, coordinator_address="127.0.0.1:{port}", num_processes=2,
                          process_id=process_id, cpu_collectives="gloo"))
result = loop.train_and_evaluate(c, {workdir!r})
import jax
import numpy as np
leaves = jax.tree.leaves(jax.device_get(result["state"].params))
np.savez(os.path.join({workdir!r}, f"params_{{process_id}}.npz"), *leaves)
print("RESULT " + json.dumps({{
    "devices": jax.device_count(), "local_devices": jax.local_device_count(), "local_batches": shapes,
    "history": result["history"]}}))
"""


BIASES_BEFORE_BATCHNORM = ("['backbone']['norm']['bias']", "['projector']['hidden_0']['bias']",
                           "['projector']['linear_out']['bias']", "['predictor']['hidden_0']['bias']")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(uninterrupted, tmp_path):
    """2 processes x 2 CPU devices (gloo collectives) train the smoke preset like 1 process x 8 devices."""
    import json
    code = WORKER.format(root=ROOT, port=_free_port(), workdir=str(tmp_path))
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[len("RESULT "):]))
    full = dict(uninterrupted["history"])
    paths, one_process = zip(*jax.tree_util.tree_flatten_with_path(jax.device_get(uninterrupted["state"].params))[0])
    for process_id, r in enumerate(results):
        assert (r["devices"], r["local_devices"]) == (4, 2)
        assert r["local_batches"] == [8] * 6  # each process reads only its half of the global batch of 16
        for step, metrics in r["history"]:
            np.testing.assert_allclose(metrics["loss"], full[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
            np.testing.assert_allclose(metrics["key_std"], full[step]["key_std"], rtol=1e-5)
        with np.load(os.path.join(tmp_path, f"params_{process_id}.npz")) as saved:
            leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        assert len(leaves) == len(one_process)
        for i, (a, b) in enumerate(zip(leaves, one_process)):  # every parameter, not a summary of them
            name = jax.tree_util.keystr(paths[i])
            assert a.shape == b.shape, name
            # Biases whose shift a following Linear + BatchNorm removes (each MLP's hidden_0; the projector's
            # output, which feeds the predictor; the backbone's final-norm bias, which feeds the projector) have an
            # exactly zero gradient: AdamW turns its rounding noise, which differs with the reduction order, into
            # steps of up to lr. A loose bound there; every other parameter to 1e-5.
            atol = 1e-4 if name in BIASES_BEFORE_BATCHNORM else 1e-7
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=name)
    assert [s for s, _ in results[0]["history"]] == [2, 4, 6]
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "6"))


EVAL_CALLS = []


def recording_eval(*, config, params, step, workdir, scale=1.0):
    """A stand-in evaluator for the ``config.evals`` hook."""
    EVAL_CALLS.append((step, sorted(params), workdir))
    return {"fake_metric": scale * step}


@pytest.mark.slow
def test_evaluation_hook_is_called_every_n_steps(uninterrupted, tmp_path):
    EVAL_CALLS.clear()
    c = smoke_config(stop_after_steps=5)
    c.evals.every_steps = 2
    c.evals.fn = f"{__name__}:recording_eval"
    c.evals.kwargs = {"scale": 10.0}
    with count_compilations("train_step") as compiles:
        result = loop.train_and_evaluate(c, str(tmp_path))
    assert [s for s, _, _ in EVAL_CALLS] == [2, 4, 5]  # every 2 steps and after the last one
    assert EVAL_CALLS[0][1] == ["default", "online", "target"]
    assert result["evals"][0] == (2, {"fake_metric": 20.0})
    assert len(compiles) == 1  # the evaluation hook does not make the step recompile

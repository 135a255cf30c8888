"""evaluate.py / swin_ssl.evaluators.run: results.json, checkpoint loading that fails loudly, config presets."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import knn as knn_config
from configs import linear as linear_config
from swin_ssl.evaluators import loading, run
from swin_ssl.models import create_model
from tests.xla_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_INIT = jax.jit(create_model("swin_test").init)  # one compilation for every seed


def swin_test_params(seed=3):
    return _INIT({"params": jax.random.PRNGKey(seed)}, np.zeros((1, 32, 32, 3), np.float32))["params"]


def test_results_json_from_params_file(tmp_path):
    params_path = str(tmp_path / "backbone.npz")
    loading.save_params_file(params_path, {"params": swin_test_params()})
    config = knn_config.get_config("smoke")
    config.init = "params_file"
    config.params_path = params_path
    metrics = run.evaluate(config, str(tmp_path / "out"))
    with open(tmp_path / "out" / "results.json") as f:
        saved = json.load(f)
    assert saved["metrics"] == pytest.approx(metrics)
    assert saved["evaluated"]["source"] == params_path and saved["evaluated"]["model"] == "swin_test"
    assert {"knn/top1_k20", "knn/top5_k20", "knn/top1_k200"} <= set(saved["metrics"])
    assert saved["metrics"]["knn/num_queries"] == config.dataset.synthetic_test
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "out"))


def test_mismatched_params_fail_naming_them(tmp_path):
    flat = loading.flatten(jax.device_get(swin_test_params()))
    dropped = "layers_1/blocks_1/mlp/fc2/kernel"
    reshaped = "norm/scale"
    del flat[dropped]
    flat[reshaped] = np.zeros((7,), np.float32)
    flat["head/kernel"] = np.zeros((32, 10), np.float32)
    path = str(tmp_path / "bad.npz")
    loading.save_params_file(path, loading.unflatten(flat))
    config = knn_config.get_config("smoke")
    config.init = "params_file"
    config.params_path = path
    with pytest.raises(loading.ParamMismatchError) as err:
        run.evaluate(config, str(tmp_path / "out"))
    message = str(err.value)
    assert "missing (1): " + dropped in message
    assert "unexpected (1): head/kernel" in message
    assert f"{reshaped} expected (32,) got (7,)" in message
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_checkpoint_of_another_model_fails():
    """swin_test weights into swin_nano: nothing silently loads."""
    model = create_model("swin_nano")
    tree = {"params": {"backbone": swin_test_params()}}
    with pytest.raises(loading.ParamMismatchError, match="missing .*layers_2"):
        loading.check_params(loading.expected_params(model, (32, 32, 3)), loading.select_network(tree, "online"))


def test_select_network_in_a_train_state():
    online, target, proj = {"w": np.zeros(2)}, {"w": np.ones(2)}, {"p": np.zeros(1)}
    state = {"step": 5, "params": {"backbone": online, "projector": proj}, "opt_state": {},
             "target_params": {"backbone": target, "projector": proj}}
    assert loading.select_network(state, "online") is online
    assert loading.select_network(state, "target") is target
    assert loading.select_network({"params": online}, "target") is online  # imported backbone: no network level
    with pytest.raises(loading.ParamMismatchError, match="no target"):
        loading.select_network({"step": 1, "params": {"backbone": online}, "opt_state": {}}, "target")


def test_moby_evaluation_resizes_bilinear():
    """MoBY's official evaluation resizes with torchvision's default (bilinear), DINO/EsViT's with bicubic; the eval
    pipeline of each preset, and the in-training k-NN of each training recipe, use its objective's interpolation."""
    from configs import moby_swin_tiny, esvit_swin_tiny
    from swin_ssl.evaluators import datasets, knn

    for preset, want in (("moby", "bilinear"), ("esvit", "bicubic"), ("dino", "bicubic")):
        for module in (knn_config, linear_config):
            assert datasets.pipeline_config(module.get_config(preset).dataset).eval_interpolation == want, preset
    for recipe, want in ((moby_swin_tiny, "bilinear"), (esvit_swin_tiny, "bicubic")):
        data_cfg = knn.eval_dataset_for(recipe.get_config("paper300"), 10, 10)
        assert datasets.pipeline_config(data_cfg).eval_interpolation == want


def test_configs_presets():
    c = linear_config.get_config("esvit")
    assert (c.network, c.feature, c.n_last_blocks) == ("target", "last_blocks", 4)
    assert (c.linear.base_lr, c.linear.lr_batch_base, c.linear.nesterov, c.linear.label_smoothing) == (1e-3, 256,
                                                                                                        False, 0.0)
    m = linear_config.get_config("moby")
    assert (m.network, m.feature, m.linear.backbone_train, m.model.drop_path_rate) == ("online", "pooled", True, 0.2)
    assert (m.linear.base_lr, m.linear.lr_batch_base, m.linear.nesterov, m.linear.label_smoothing,
            m.linear.grad_clip, m.linear.warmup_epochs) == (1.0, 512, True, 0.1, 5.0, 5.0)
    k = knn_config.get_config()
    assert tuple(k.knn.ks) == (10, 20, 100, 200) and k.knn.temperature == 0.07 and k.network == "target"
    with pytest.raises(ValueError, match="unknown preset"):
        knn_config.get_config("nope")


@pytest.mark.slow
def test_cli_writes_results_and_rejects_typos(tmp_path):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), "--config", os.path.join(REPO, "configs/linear.py:smoke"),
           "--workdir", str(tmp_path)]
    bad = subprocess.run(cmd + ["--config.linear.epochz=3"], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode != 0 and "epochz" in bad.stderr
    ok = subprocess.run(cmd + ["--config.feature=raw_pixels"], capture_output=True, text=True, env=env, cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["evaluated"]["feature"] == "raw_pixels" and "linear/top1" in saved["metrics"]
    assert "linear/top1" in ok.stdout


@pytest.mark.slow
def test_training_checkpoint_picks_the_network(tmp_path):
    """A workdir written by swin_ssl.checkpoint: network 'default' follows the objective's meta (here the
    target), 'online' picks the online backbone, the model comes from the meta's training config."""
    from swin_ssl import checkpoint

    online, target = swin_test_params(1), swin_test_params(2)
    state = {"step": np.int32(7), "params": {"backbone": online, "projector": {"w": np.zeros(3, np.float32)}},
             "target_params": {"backbone": target}, "rng": np.zeros(2, np.uint32)}
    meta = {"step": 7, "objective": "esvit", "model": "swin_test", "eval_backbone": "target",
            "config": {"model": {"name": "swin_test", "overrides": {}}, "data": {"image_size": 32}}}
    manager = checkpoint.make_manager(str(tmp_path / "run"), every_steps=1, keep=1, asynchronous=False)
    checkpoint.save(manager, 7, state, meta, force=True)
    manager.wait_until_finished()
    manager.close()

    config = knn_config.get_config("smoke")
    config.init, config.checkpoint_dir, config.model.name = "checkpoint", str(tmp_path / "run"), ""
    for network, expected in [("default", target), ("target", target), ("online", online)]:
        config.network = network
        model, params, info = run.load(config)
        assert info["model"] == "swin_test" and info["checkpoint_step"] == 7
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info["network"] == "online"


def test_converted_file_layout(tmp_path):
    """A swin_ssl.convert-style .msgpack (MoBY layout + JSON meta): the model comes from the meta, network 'default'
    is MoBY's online encoder, 'target' the momentum encoder."""
    import flax

    online, target = swin_test_params(4), swin_test_params(5)
    variables = {"online": {"backbone": {"params": online}, "projector": {"params": {"w": np.ones(2, np.float32)}}},
                 "target": {"backbone": {"params": target}},
                 "meta": json.dumps({"format": "x", "layout": "moby", "model": "swin_test", "model_kwargs": {}})}
    path = tmp_path / "moby.msgpack"
    path.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(variables)))
    config = knn_config.get_config("smoke")
    config.init, config.params_path, config.model.name = "params_file", str(path), ""
    for network, expected in [("default", online), ("target", target)]:
        config.network = network
        _, params, info = run.load(config)
        assert info["model"] == "swin_test"
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pooled_is_the_tail_of_the_last_blocks_feature():
    """compare.py reads the pooled (k-NN / MoBY) feature off the EsViT last-4-blocks concatenation."""
    from swin_ssl.evaluators import common

    model = create_model("swin_test")
    params = swin_test_params()
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    feats = jax.jit(lambda p, x: model.apply({"params": p}, x)[1])(params, images)
    last = np.asarray(common.select_features(feats, "last_blocks", 4))
    assert last.shape == (3, 16 + 16 + 32 + 32)  # swin_test: 2 stage-1 blocks (16-d) + 2 stage-2 blocks (32-d)
    np.testing.assert_allclose(last[:, -model.num_features:], np.asarray(feats["pooled"]), rtol=1e-6, atol=1e-6)


def test_fashion_mnist_eval_view_is_the_pipeline_view():
    """The evaluators' 28 -> 32 px resize of a whole Fashion-MNIST image equals the data pipeline's eval view with
    ``eval_crop_pct=1`` (what the Fashion-MNIST presets set) and a training crop at scale 1: one framing for all."""
    import tensorflow as tf

    from swin_ssl.data import augment
    from swin_ssl.evaluators import datasets

    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    ours = datasets.to_model_input(images, 32)
    pipeline = np.stack([augment.eval_transform(tf.convert_to_tensor(np.repeat(im[..., None], 3, -1)), 32, 1.0,
                                                "bilinear").numpy() for im in images])
    np.testing.assert_allclose(ours, pipeline, atol=1e-4)
    for preset in ("demo", "fmnist30"):
        from configs import moby_swin_tiny
        assert moby_swin_tiny.get_config(preset).data.eval_crop_pct == 1.0

"""One backbone builder: training, validation, evaluation, conversion and export build the same window/shift
geometry for a run at a non-default image size (swin_test is configured for 32 px; at 64 px its stage 1 token map
is 8x8, so the 4x4 window is shifted there, while at 32 px it is clamped and unshifted)."""
import numpy as np
import pytest

from configs import esvit_swin_tiny, knn as knn_config, moby_swin_tiny
from swin_ssl.models import create_model, from_config
from swin_ssl.models.swin import stage_geometry

SIZE = 64


def geometry(module) -> list:
    return [tuple(g) for g in stage_geometry(module.configured_size, module.patch_size, module.window_size,
                                             len(module.depths))]


def expected_geometry() -> list:
    """Worked out by hand: 64 / patch 4 = 16x16 tokens, then 8x8; both tile the 4x4 window, shifted by 2."""
    return [(4, 2), (4, 2)]


def training_config(objective: str):
    config = (moby_swin_tiny if objective == "moby" else esvit_swin_tiny).get_config("smoke")
    assert config.model.name == "swin_test" and create_model("swin_test").img_size != SIZE
    config.data.image_size = SIZE
    if objective != "moby":
        config.data.local_size = 32
    return config


@pytest.mark.parametrize("objective", ["moby", "esvit"])
def test_training_and_evaluation_build_the_same_geometry(objective):
    from swin_ssl.evaluators import knn, run
    from swin_ssl.objectives import dino, moby
    from swin_ssl.train import validate

    config = training_config(objective)
    assert geometry(create_model("swin_test")) != expected_geometry()  # the preset's 32-px geometry differs
    build = moby.build_networks if objective == "moby" else dino.build_networks
    trained = build(config)[:2]  # online/target or student/teacher
    meta = {"model": config.model.name, "config": config.to_dict()}
    eval_config = knn_config.get_config("smoke")
    eval_config.model.name = ""
    built = {"training": trained[0], "target": trained[1], "validation": validate._model(config),
             "in-training k-NN": knn.training_model(config), "evaluate.py": run.build_model(eval_config, meta)}
    assert {k: geometry(m) for k, m in built.items()} == {k: expected_geometry() for k in built}


@pytest.mark.slow
def test_export_of_a_run_uses_the_training_geometry(tmp_path, monkeypatch):
    """export_workdir writes the attention masks of the shifted blocks; at 64 px stage 1 is shifted, so its second
    block has a mask (at the preset's 32 px it would not)."""
    import jax

    from swin_ssl.convert import exporting, read_pth
    from swin_ssl.evaluators import loading

    config = training_config("esvit")
    module = from_config(config.model, SIZE)
    params = jax.tree.map(np.asarray, module.init(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3)))["params"])
    state = {"params": {"backbone": params}, "target_params": {"backbone": params}}
    meta = {"model": "swin_test", "eval_backbone": "target", "config": config.to_dict()}
    (tmp_path / "checkpoints").mkdir()  # a training workdir (its checkpoint comes from the patched restore)
    monkeypatch.setattr(loading, "restore_workdir", lambda workdir, step=None: (state, meta))
    path = str(tmp_path / "teacher.pth")
    exporting.export_workdir(str(tmp_path), path, attn_mask=True)
    state = read_pth(path)["model"]
    assert "layers.1.blocks.1.attn_mask" in state
    assert state["layers.1.blocks.1.attn_mask"].shape[0] == (SIZE // 4 // 2 // 4) ** 2  # 4 windows of stage 1


def test_overrides_and_fields_take_precedence():
    cfg = {"name": "swin_test", "overrides": {"window_size": 2}}
    m = from_config(cfg, SIZE, drop_path_rate=0.1)
    assert (m.img_size, m.window_size, m.drop_path_rate, m.num_classes) == (SIZE, 2, 0.1, 0)
    assert from_config({"name": "swin_test", "overrides": {"img_size": 48}}, SIZE).img_size == 48
    assert from_config({"name": "swin_test"}, None).img_size == create_model("swin_test").img_size


def test_a_converted_file_for_the_size_is_evaluated_with_its_geometry(tmp_path):
    """Converting official weights for 64 px (``--img-size 64``) stores the size; the evaluators' loader rebuilds
    the backbone from the file's meta with the 64-px geometry."""
    import jax

    from swin_ssl import convert
    from swin_ssl.evaluators import loading

    module = create_model("swin_test", img_size=SIZE)
    variables = module.init(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3)))
    official = {k: np.asarray(v) for k, v in convert.export_slot(jax.device_get(variables), module=module).items()}
    converted = convert.import_state(official, "swin_test", model_kwargs={"img_size": SIZE})
    path = str(tmp_path / "swin_test_64.msgpack")
    convert.save_converted(converted, path)
    loaded, params, _ = loading.load_network(path)
    assert geometry(loaded) == geometry(convert.load_backbone(path)[0]) == expected_geometry()
    np.testing.assert_array_equal(params["norm"]["scale"], np.asarray(variables["params"]["norm"]["scale"]))

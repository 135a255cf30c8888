"""EsViT / DINO configs: every preset loads and validates, the recipes hold the README values, and the objective
builds the official parameter counts (shapes only, nothing compiled)."""

import jax
import pytest

from configs import dino_vit_small, esvit_swin_base, esvit_swin_small, esvit_swin_tiny  # noqa: E402
from swin_ssl.objectives import dino  # noqa: E402
from swin_ssl.train import validate as validate_lib  # noqa: E402

MODULES = [esvit_swin_tiny, esvit_swin_small, esvit_swin_base, dino_vit_small]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.split(".")[-1])
def test_every_preset_validates(module, fmnist_stub_dir):
    for preset in module.PRESETS:
        config = module.get_config(preset)
        if config.data.name == "fashion_mnist":
            config.data.data_dir = fmnist_stub_dir
        d = validate_lib.validate(config, device_count=8)
        assert d.total_steps > d.warmup_steps >= 0, preset


def test_recipes_hold_the_readme_values():
    c = esvit_swin_tiny.get_config("paper300")
    assert (c.objective, c.model.name, c.batch_size, c.total_epochs, c.warmup_epochs) == ("esvit", "swin_tiny", 512, 300, 10)
    assert dict(c.model.overrides) == {"norm_eps": 1e-6, "window_size": 7}
    assert (c.model.drop_path_rate, c.model.target_drop_path_rate) == (0.1, 0.0)
    d = c.dino
    assert (d.out_dim, d.norm_last_layer, d.region, d.teacher_temp, d.warmup_teacher_temp,
            d.warmup_teacher_temp_epochs, d.student_temp, d.center_momentum, d.momentum) == (
        65536, False, True, 0.07, 0.04, 30, 0.1, 0.9, 0.996)
    assert (c.data.augment, c.data.image_size, tuple(c.data.crop_scale), c.data.num_local_crops, c.data.local_size,
            tuple(c.data.local_scale)) == ("multicrop", 224, (0.4, 1.0), 8, 96, (0.05, 0.4))
    o = c.optim
    assert (o.base_lr, o.lr_batch_base, o.warmup_lr, o.weight_decay, o.weight_decay_end, o.clip_mode, o.clip_norm,
            tuple(o.freeze_patterns), o.freeze_epochs, o.cosine_from_start) == (
        5e-4, 256, 0.0, 0.04, 0.4, "per_param", 3.0, ("last_layer",), 1.0, False)
    assert (o.min_lr, o.scale_min_lr) == (1e-6, False)  # DINO's absolute min_lr
    assert esvit_swin_tiny.get_config("paper300_w14").model.overrides.window_size == 14
    assert esvit_swin_tiny.get_config("view300").dino.region is False
    for module in (esvit_swin_small, esvit_swin_base):
        assert module.get_config(None).model.drop_path_rate == 0.2
    v, b = dino_vit_small.get_config("vanilla100"), dino_vit_small.get_config("boosted300")
    assert (v.objective, v.model.name, v.total_epochs, v.batch_size, v.dino.teacher_temp,
            v.dino.warmup_teacher_temp_epochs, v.dino.norm_last_layer) == ("dino", "vit_small", 100, 512, 0.04, 0, True)
    assert (b.total_epochs, b.batch_size, b.dino.teacher_temp, b.dino.warmup_teacher_temp_epochs,
            b.dino.norm_last_layer) == (300, 1024, 0.07, 30, False)


def _param_counts(config):
    objective = dino.make_objective(config, durations=validate_lib.durations(config))
    parts = jax.eval_shape(objective.init, jax.random.PRNGKey(0))
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    return {k: count(v) for k, v in parts["params"].items()}, parts


# DINO head (in -> 2048 -> 2048 -> 256 -> 65536): Linear weights + biases, weight-normalised last layer (v, and g
# [65536] when norm_last_layer=False). Backbones: Swin-T 27,519,354 (no classifier), ViT-S
# 21,665,664; Swin-T W14 has 729-row instead of 169-row bias tables in the 2+2+6 blocks of stages 1-3
# (3, 6, 12 heads): + (729 - 169) * (2*3 + 2*6 + 6*12) = 50,400.
def _head(d_in, g):
    return d_in * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256 + 256 * 65536 + (65536 if g else 0)


@pytest.mark.parametrize("preset,backbone", [("paper300", 27_519_354), ("paper300_w14", 27_569_754)])
def test_esvit_parameter_counts(preset, backbone):
    counts, parts = _param_counts(esvit_swin_tiny.get_config(preset))
    assert counts == {"backbone": backbone, "head": _head(768, True), "head_dense": _head(768, True)}
    assert _head(768, True) == 23_138_560  # the official DINO head's parameter count
    assert set(parts["obj_state"]) == {"center", "center_grid"}
    assert parts["obj_state"]["center"].shape == (65536,)


def test_dino_parameter_counts():
    counts, parts = _param_counts(dino_vit_small.get_config("vanilla100"))
    assert counts == {"backbone": 21_665_664, "head": _head(384, False)}
    assert set(parts["obj_state"]) == {"center"}

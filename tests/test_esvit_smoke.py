"""The EsViT (Swin) and DINO (ViT) smoke presets end to end through the trainer's ``train_and_evaluate``:
multi-crop batches, the objective's schedules and health metrics, checkpoints, and a step compiled once."""
import glob
import math
import os
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import dino_vit_small, esvit_swin_tiny  # noqa: E402
from swin_ssl.checkpoint import restore_raw  # noqa: E402
from tests.jit_helpers import count_compilations  # noqa: E402
from swin_ssl.train import loop  # noqa: E402


def multicrop_synthetic(config, *, process_index, process_count, start_step):
    """Deterministic synthetic multi-crop batches (globals at image_size, locals at local_size) of this host."""
    data, local = config.data, int(config.batch_size) // process_count
    step = start_step
    while True:
        rng = np.random.default_rng([int(config.seed), step, process_index])
        coarse = rng.normal(size=(local, 4, 4, 3))
        batch = {}
        for name, size in [(f"global{i}", int(data.image_size)) for i in range(2)] + \
                          [(f"local{i}", int(data.local_size)) for i in range(int(data.num_local_crops))]:
            image = np.kron(coarse, np.ones((1, size // 4, size // 4, 1)))
            batch[name] = (image + 0.5 * rng.normal(size=image.shape)).astype(np.float32)
        yield batch
        step += 1


@pytest.fixture
def multicrop_input(monkeypatch):
    """Use the trainer's synthetic source when it makes multi-crop batches, else the generator above."""
    config = esvit_swin_tiny.get_config("smoke")
    probe = next(loop.data_lib.make_train_iterator(config, process_index=0, process_count=1, start_step=0))
    if "global0" not in probe:
        monkeypatch.setattr(loop.data_lib, "make_train_iterator", multicrop_synthetic)


@pytest.mark.slow
@pytest.mark.parametrize("module,model,region", [(esvit_swin_tiny, "swin_test", True),
                                                 (dino_vit_small, "vit_test", False)])
def test_smoke_preset_trains_end_to_end(module, model, region, multicrop_input, tmp_path):
    config = module.get_config("smoke")
    assert config.model.name == model and config.dino.region == region
    start = time.time()
    with count_compilations("train_step") as compiles:
        result = loop.train_and_evaluate(config, str(tmp_path))
    seconds = time.time() - start
    history = dict(result["history"])
    assert result["step"] == 6 and sorted(history) == [2, 4, 6]
    assert len(compiles) == 1  # the step compiled once
    keys = ["loss", "view_loss", "teacher_entropy", "kl", "center_norm", "teacher_temp", "momentum", "lr",
            "weight_decay"]
    if region:
        keys += ["region_loss", "region_kl", "region_teacher_entropy", "center_grid_norm"]
    for step, metrics in history.items():
        for key in keys:
            assert math.isfinite(metrics[key]), (step, key)
    # Logged metrics of step s are those of update index s - 1; 3 steps per epoch.
    if config.dino.warmup_teacher_temp_epochs:  # EsViT smoke: linspace(0.04, teacher_temp, 2) per epoch
        assert history[2]["teacher_temp"] == pytest.approx(0.04)
        assert history[4]["teacher_temp"] == pytest.approx(config.dino.teacher_temp)
    np.testing.assert_allclose(history[6]["momentum"], 1 - (1 - config.dino.momentum) * (math.cos(math.pi * 5 / 6) + 1) / 2,
                               rtol=1e-6)
    assert history[2]["center_norm"] > 0  # centers are updated (from 0) and logged before this step's update
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(str(tmp_path), "checkpoints", "*"))
                   if os.path.basename(p).isdigit())
    assert steps[-1] == 6
    assert restore_raw(str(tmp_path))[1]["eval_backbone"] == "target"  # DINO/EsViT: the teacher
    state = result["state"]
    assert set(state.obj_state) == ({"center", "center_grid"} if region else {"center"})
    print(f"{module.__name__}:smoke {seconds:.1f}s for 6 steps incl. compilation")

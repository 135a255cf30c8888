"""Every config rule fails with its exact one-line message, naming the key, before anything is built or compiled
(the list is in README "Config rules")."""
import math
import subprocess
import sys

import pytest

from configs import esvit_swin_tiny, knn as knn_config, linear as linear_config, moby_swin_tiny
from swin_ssl import config_files
from swin_ssl.evaluators import run
from swin_ssl.train import validate

MOBY, ESVIT = moby_swin_tiny.get_config, esvit_swin_tiny.get_config
FLOAT16 = "float16 needs loss scaling, which the trainer does not do; use bfloat16"


def _set(config, key: str, value):
    *blocks, last = key.split(".")
    for block in blocks:
        config = config[block]
    config[last] = value


@pytest.mark.parametrize("recipe,key,value,message", [
    (MOBY, "data.image_size", 0, "config.data.image_size=0: must be > 0"),
    (MOBY, "data.image_size", -32, "config.data.image_size=-32: must be > 0"),
    (ESVIT, "data.local_size", -16, "config.data.local_size=-16: must be a positive multiple of the swin_test patch "
                                    "size 4"),
    (MOBY, "data.num_train_examples", 0, "config.data.num_train_examples=0: must be > 0"),
    (MOBY, "seed", -1, "config.seed=-1: must be >= 0"),
    (MOBY, "optim.min_lr", math.nan, "config.optim.min_lr=nan: must be a number, not NaN"),
    (MOBY, "optim.base_lr", -1e-3, "config.optim.base_lr=-0.001: must be a finite number >= 0"),
    (MOBY, "optim.warmup_lr", math.inf, "config.optim.warmup_lr=inf: must be a finite number >= 0"),
    (MOBY, "optim.clip_norm", -5.0, "config.optim.clip_norm=-5.0: must be > 0"),
    (ESVIT, "optim.clip_norm", math.nan, "config.optim.clip_norm=nan: must be a number, not NaN"),
    (ESVIT, "optim.weight_decay_end", -0.4, "config.optim.weight_decay_end=-0.4: must be a finite number >= 0"),
    (MOBY, "optim.b2", 1.5, "config.optim.b2=1.5: must be in [0, 1]"),
    (MOBY, "moby.momentum", 1.5, "config.moby.momentum=1.5: must be in [0, 1]"),
    (ESVIT, "dino.momentum", -0.1, "config.dino.momentum=-0.1: must be in [0, 1]"),
    (ESVIT, "dino.center_momentum", 2.0, "config.dino.center_momentum=2.0: must be in [0, 1]"),
    (MOBY, "moby.temperature", 0.0, "config.moby.temperature=0.0: must be > 0"),
    (ESVIT, "dino.teacher_temp", 0.0, "config.dino.teacher_temp=0.0: must be > 0"),
    (ESVIT, "dino.student_temp", -0.1, "config.dino.student_temp=-0.1: must be > 0"),
    (ESVIT, "dino.warmup_teacher_temp", 0.0, "config.dino.warmup_teacher_temp=0.0: must be > 0"),
    (MOBY, "moby.proj_dim", -1, "config.moby.proj_dim=-1: must be > 0"),
    (ESVIT, "dino.out_dim", 0, "config.dino.out_dim=0: must be > 0"),
    (MOBY, "model.dtype", "float16", f"config.model.dtype='float16': {FLOAT16}"),
    (MOBY, "model.drop_path_rate", 1.2, "config.model.drop_path_rate=1.2: must be in [0, 1]"),
])
def test_training_rule(recipe, key, value, message):
    config = recipe("smoke")
    _set(config, key, value)
    with pytest.raises(ValueError) as info:
        validate.validate(config, device_count=8)
    assert str(info.value) == message


def test_a_typo_in_a_config_file_names_the_closest_key():
    config = MOBY("smoke")
    config.optim.weight_decy = 0.1
    with pytest.raises(ValueError, match=r"^config\.optim\.weight_decy: unknown key; did you mean "
                                         r"optim\.weight_decay\? \(known in config\.optim: b1, b2, ") as info:
        validate.validate(config, device_count=8)
    assert "\n" not in str(info.value)


def test_the_blocks_known_keys_come_from_the_modules_that_read_them():
    from swin_ssl.objectives import dino, moby
    from swin_ssl.train import optim
    assert set(MOBY("smoke").moby.keys()) == set(moby.DEFAULTS)
    assert set(ESVIT("smoke").dino.keys()) == set(dino.DEFAULTS)
    assert set(MOBY("smoke").optim.keys()) == set(ESVIT("smoke").optim.keys()) == set(optim.defaults().keys())


@pytest.mark.parametrize("module,key,value,message", [
    (knn_config, "knn.temperature", 0.0, "config.knn.temperature=0.0: must be > 0"),
    (knn_config, "knn.temperature", -0.07, "config.knn.temperature=-0.07: must be > 0"),
    (knn_config, "batch_size", 0, "config.batch_size=0: must be > 0"),
    (knn_config, "knn.query_chunk", 0, "config.knn.query_chunk=0: must be > 0"),
    (knn_config, "feature", "cls", "config.feature='cls': must be one of pooled, last_blocks, cls_avgpool, "
                                   "raw_pixels"),
    (linear_config, "batch_size", -8, "config.batch_size=-8: must be > 0"),
    (linear_config, "linear.epochs", 0, "config.linear.epochs=0: must be > 0"),
])
def test_evaluation_rule(module, key, value, message, tmp_path):
    config = module.get_config("smoke")
    _set(config, key, value)
    with pytest.raises(ValueError) as info:
        run.evaluate(config, str(tmp_path))
    assert str(info.value) == message
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("config_file,override,message", [
    ("knn.py:smoke", "--config.data.data_dir=/x",
     "--config.data.data_dir: config has no key 'data'; did you mean --config.dataset? (known: batch_size, "),
    ("knn.py:smoke", "--config.knn.temprature=1",
     "--config.knn.temprature: config.knn has no key 'temprature'; did you mean --config.knn.temperature? "),
    ("moby_swin_tiny.py:smoke", "--config.optim.clip_nrm=3",
     "--config.optim.clip_nrm: config.optim has no key 'clip_nrm'; did you mean --config.optim.clip_norm? "),
])
def test_a_mistyped_override_names_the_closest_key(config_file, override, message):
    argv = ["evaluate.py", "--config", f"{config_files.CONFIG_DIR}/{config_file}", override]
    assert config_files.unknown_override(argv).startswith(message)
    assert config_files.unknown_override(argv[:-1]) is None


def test_evaluate_py_prints_one_line_for_a_mistyped_override(tmp_path):
    root = config_files.CONFIG_DIR.rsplit("/", 1)[0]
    result = subprocess.run([sys.executable, "evaluate.py", "--config", "configs/knn.py:smoke",
                             "--config.data.data_dir=/x", "--workdir", str(tmp_path)],
                            cwd=root, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines == [lines[0]] and "did you mean --config.dataset?" in lines[0], result.stderr

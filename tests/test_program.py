"""The paper configs load and their train programs build without TensorFlow (or clu, or tfds) in the process:
what an accelerator host without the input-pipeline packages, and the step benchmarks, rely on."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parameter counts worked out from the official models: Swin-T has 28,288,354 parameters with its 1000-class
# head (768 * 1000 + 1000), so 27,519,354 without.
SWIN_T = 28_288_354 - (768 * 1000 + 1000)
# MoBY: projector 768 -> 4096 (BN) -> 256 and predictor 256 -> 4096 (BN) -> 256, biases and BN scale/shift.
MOBY_HEADS = (768 * 4096 + 4096 + 2 * 4096 + 4096 * 256 + 256) + (256 * 4096 + 4096 + 2 * 4096 + 4096 * 256 + 256)
# EsViT: two DINO heads (view, region), each 768 -> 2048 -> 2048 -> 256 and a weight-normed 256 -> 65536
# (direction 256 x 65536 and one norm per output).
DINO_HEAD = (768 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 256 + 256) + 256 * 65536 + 65536

SCRIPT = textwrap.dedent("""
    import json, sys

    class NoTensorFlow:  # importing any of these fails, as on a host that lacks them
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu"):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoTensorFlow())
    import jax
    from swin_ssl.config_files import load_config
    from swin_ssl.train import program, validate

    counts = {}
    for spec in ("configs/moby_swin_tiny.py:paper300", "configs/esvit_swin_tiny.py:paper300"):
        config = load_config(spec)
        built = program.build_program(config, validate.durations(config))
        state = jax.eval_shape(built.init, jax.random.PRNGKey(0))
        counts[spec] = sum(x.size for x in jax.tree.leaves(state.params))
    print(json.dumps(counts))
""")


def test_paper_programs_build_without_tensorflow():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["configs/moby_swin_tiny.py:paper300"] == SWIN_T + MOBY_HEADS == 33_835_898
    assert counts["configs/esvit_swin_tiny.py:paper300"] == SWIN_T + 2 * DINO_HEAD == 73_796_474

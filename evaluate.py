r"""Evaluate a backbone with k-NN or a linear probe; writes WORKDIR/results.json and TensorBoard scalars.

    python evaluate.py --config configs/knn.py:esvit --config.checkpoint_dir runs/esvit --workdir runs/esvit/knn
    python evaluate.py --config configs/linear.py:moby --config.checkpoint_dir runs/moby --workdir runs/moby/linear
    python evaluate.py --config configs/knn.py:fmnist --config.init=random_init --workdir /tmp/knn_random

See configs/knn.py and configs/linear.py for the presets, swin_ssl/evaluators/run.py for the config schema.
"""
from absl import app, flags
from ml_collections import config_flags

from swin_ssl import host_memory
from swin_ssl.config_files import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config (configs/knn.py or configs/linear.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory for results.json and TensorBoard events.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.keep_freed_memory_mapped()  # before JAX starts its backend
    from swin_ssl.evaluators.run import evaluate  # after flag parsing: JAX reads XLA_FLAGS at import
    evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)  # a mistyped --config.x=y override: one line, no traceback

r"""Self-supervised pretraining entry point (thin: flags -> config -> library call).

    python train.py --config configs/moby_swin_tiny.py:smoke --workdir /tmp/moby_smoke
    python train.py --config configs/moby_swin_tiny.py:paper300 --workdir runs/moby_swin_t \
        --config.batch_size=1024 --config.data.data_dir=/data/tfds

Rerunning with the same ``--workdir`` resumes from its latest checkpoint. ``--config.key=value`` overrides any
config field; a misspelt key fails (``lock_config=True``). Logs: TensorBoard event files in the workdir.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from swin_ssl.config_files import parse_flags
from swin_ssl.train.loop import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file[:preset].", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard logs go here; resumed from if present.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("Config:\n%s", FLAGS.config)
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)  # a mistyped --config.x=y override: one line, no traceback

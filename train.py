r"""Self-supervised pretraining entry point (thin: flags -> config -> library call).

    python train.py --config configs/moby_swin_tiny.py:smoke --workdir /tmp/moby_smoke
    python train.py --config configs/moby_swin_tiny.py:paper300 --workdir gs://bucket/moby_swin_t \
        --config.batch_size=1024 --config.data.data_dir=gs://bucket/tfds

Rerunning with the same ``--workdir`` resumes from its latest checkpoint. ``--config.key=value`` overrides any
config field; a misspelt key fails (``lock_config=True``). Logs: TensorBoard event files in the workdir.

Exit status: 0 finished; 143 preempted (SIGTERM or the multi-host preemption service; the checkpoint of the
current step was saved: rerun to resume); 75 storage could not be read now (nothing was changed: rerun later);
2 the run was refused (a live lock on the workdir, a changed run-defining config, checkpoints lost: the one-line
message says what to do); 1 any other error.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from swin_ssl import host_memory
from swin_ssl.config_files import parse_flags
from swin_ssl.hosts import RunRefused, StorageUnavailable
from swin_ssl.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file[:preset].", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard logs go here (a folder or gs://bucket/path); "
                                     "resumed from if present.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.info("Config:\n%s", FLAGS.config)
    logging.info("XLA:CPU scratch memory kept mapped between steps: %s", host_memory.keep_freed_memory_mapped())
    try:
        result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (RunRefused, StorageUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return loop.EXIT_REFUSED if isinstance(e, RunRefused) else loop.EXIT_RETRY_LATER
    return loop.EXIT_PREEMPTED if result["preempted"] else 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)  # a mistyped --config.x=y override: one line, no traceback

"""``make demo``: pretrain a tiny Swin on Fashion-MNIST on the CPU, then k-NN it against random init and raw pixels.

    python -m swin_ssl.demo --objective moby --workdir runs/demo_moby     # (what `make demo` runs)
    python -m swin_ssl.demo --objective esvit --workdir runs/demo_esvit   # `make demo OBJECTIVE=esvit`

The recipe is the ``demo`` preset of ``configs/moby_swin_tiny.py`` (or ``configs/esvit_swin_tiny.py``); extra
``--config.key=value`` style overrides are not taken here: use ``train.py`` for full control. Rerunning resumes
from the workdir (a finished run goes straight to the evaluation).
"""
from __future__ import annotations

import argparse
import os
import time

from swin_ssl.config_files import load_config

CONFIG_FILES = {"moby": "moby_swin_tiny.py", "esvit": "esvit_swin_tiny.py"}


def load_preset(objective: str, preset: str = "demo"):
    return load_config(f"configs/{CONFIG_FILES[objective]}:{preset}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=sorted(CONFIG_FILES), default="moby")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()
    workdir = args.workdir or f"runs/demo_{args.objective}"

    # Imported here so that --help works instantly.
    from absl import logging
    from swin_ssl import host_memory
    from swin_ssl.evaluators.compare import knn_comparison
    from swin_ssl.train.loop import train_and_evaluate

    host_memory.keep_freed_memory_mapped()  # before JAX starts its backend
    logging.set_verbosity(logging.INFO)  # progress, steps/s and ETA (absl hides INFO outside app.run)
    config = load_preset(args.objective, args.preset)
    print(f"[demo] pretraining {config.model.name} with {args.objective} on Fashion-MNIST -> {os.path.abspath(workdir)}")
    start = time.time()
    train_and_evaluate(config, workdir)
    trained = time.time() - start
    print(f"[demo] pretraining took {trained / 60:.1f} min; k-NN evaluation on the 10k test set (60k bank):")
    start = time.time()
    knn_comparison(workdir)
    print(f"[demo] evaluation took {(time.time() - start) / 60:.1f} min. TensorBoard: tensorboard --logdir {workdir}")


if __name__ == "__main__":
    main()

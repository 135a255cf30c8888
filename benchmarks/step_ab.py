r"""The full train step of a config at a git revision against the working tree's, same run, alternating rounds.

Each side runs in a live subprocess: one imports ``swin_ssl`` from ``git archive <--ref>`` unpacked into a
temporary folder, the other from this checkout. Both build the program of the same config (the data set
replaced by synthetic batches of the same shapes, so only the step is timed), compile, run one step, then
take turns (the first step's seconds, compilation included, are printed too; the sides compile one after
the other): ``--rounds`` rounds of ``--steps`` steps each; medians of the per-step wall and CPU times and
their ratio are printed with the load average::

    python benchmarks/step_ab.py --ref HEAD~1                                    # make demo's step (MoBY)
    python benchmarks/step_ab.py --ref HEAD~1 --config configs/esvit_swin_tiny.py:demo
    python benchmarks/step_ab.py --ref main --config configs/moby_swin_tiny.py:paper300 --set batch_size=8

The workers see this environment's devices: one CPU device, as ``make demo`` runs; prefix
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` for the 8 simulated devices of ``benchmarks/fmnist.py``.

Only the step is timed, not the input pipeline (which a training run overlaps with the steps in a background
thread).
"""
from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from torch_reference import LiveWorker, serve_steps  # a sibling file: benchmarks run as scripts


def literal(text: str):
    """A Python literal (``8``, ``1e-3``, ``True``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def worker(config_spec: str, overrides: list[str]) -> None:
    """Runs in the subprocess: build, compile, then time the steps each ``run N`` line on stdin asks for."""
    try:  # as train.py does, at the revisions that have it
        from swin_ssl import host_memory
        host_memory.keep_freed_memory_mapped()
    except ImportError:
        pass
    import jax

    from swin_ssl.config_files import load_config
    from swin_ssl.train import data, loop, validate  # loop.build_program: also at revisions before program.py

    config = load_config(config_spec)
    config.update_from_flattened_dict({k: literal(v) for k, _, v in (o.partition("=") for o in overrides)})
    config.data.name, config.data.data_dir = "synthetic", ""
    program = loop.build_program(config, validate.validate(config, device_count=jax.device_count(),
                                                           process_count=jax.process_count()))
    batch = program.parallel.put_batch(next(data.make_train_iterator(config, process_index=0, process_count=1,
                                                                     start_step=0)))
    box = {"state": program.init(jax.random.PRNGKey(0))}

    def step():
        box["state"], metrics = program.step(box["state"], batch)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    step()  # compiles
    import swin_ssl
    serve_steps(step, {"devices": jax.device_count(), "kind": jax.devices()[0].device_kind,
                       "first_step_s": time.perf_counter() - start,
                       "code": os.path.dirname(os.path.dirname(swin_ssl.__file__))})


def export_revision(ref: str) -> str:
    """The tree of ``ref`` unpacked into a temporary folder (its path)."""
    folder = tempfile.mkdtemp(prefix="step_ab_")
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        tarfile.open(fileobj=f).extractall(folder, filter="data")
    return folder


class Side(LiveWorker):
    """One revision's worker: this script with ``--worker``, importing ``swin_ssl`` from ``root``."""

    def __init__(self, root: str, args):
        env = dict(os.environ, PYTHONPATH=root)  # devices: this environment's (make demo: one CPU device)
        super().__init__(f"worker for {root}", [sys.executable, os.path.abspath(__file__), "--worker", "--config",
                                                args.config] + [f"--set={s}" for s in args.set], cwd=root, env=env)
        if os.path.realpath(self.info["code"]) != os.path.realpath(root):
            raise RuntimeError(f"the worker for {root} imported swin_ssl from {self.info['code']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--config", default="configs/moby_swin_tiny.py:demo")
    parser.add_argument("--set", action="append", default=[], help="key=value config override (repeatable)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.config, args.set)
        return

    sides = {args.ref: Side(export_revision(args.ref), args), "working tree": Side(ROOT, args)}
    load0 = os.getloadavg()
    times = {name: {"walls": [], "cpus": []} for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            for k, v in side.run(args.steps).items():
                times[name][k] += v
    load1 = os.getloadavg()
    for side in sides.values():
        side.close()
    info = sides["working tree"].info
    print(f"{args.config} {' '.join(args.set)}: train step, {info['devices']} x {info['kind']}, {args.rounds} "
          f"alternating rounds x {args.steps} steps; load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    for name, m in med.items():
        print(f"  {name:>14}: {m['walls'] * 1e3:8.1f} ms/step wall ({1 / m['walls']:.2f} steps/s), "
              f"{m['cpus'] * 1e3:8.1f} ms CPU time; first step (compile) {sides[name].info['first_step_s']:.1f} s")
    ref, new = med[args.ref], med["working tree"]
    print(f"  working tree / {args.ref}: {ref['walls'] / new['walls']:.2f}x steps/s (wall), "
          f"{ref['cpus'] / new['cpus']:.2f}x (CPU time)")


if __name__ == "__main__":
    main()

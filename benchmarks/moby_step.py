r"""MoBY train-step throughput and peak memory (the full step: EMA, online + target passes, loss, AdamW + clip).

Default: the official-size setting the PyTorch baseline was measured in -- Swin-T at 224 px, full heads
(4096 hidden, 256 out), queue 4096, AdamW + global-norm clip 5, fp32, batch 8 -- on whatever JAX sees::

    python benchmarks/moby_step.py                                   # CPU: compare with the PyTorch baseline
    python benchmarks/moby_step.py --dtype bfloat16 --batch 64       # on a GPU
    python benchmarks/moby_step.py --preset demo --steps 20          # the CPU demo's step (swin_nano, 32 px)

Images/s count images of the global batch (each image = two views) per optimizer step, as the baseline does.
Wall-clock figures on shared machines are noisy: the CPU time per step (process time, all threads) is printed
too; compare ratios taken side by side, never single absolute numbers.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time


PYTORCH_BASELINE = {  # official Transformer-SSL MoBY step, Swin-T 224, batch 8, fp32, AdamW + clip, 2-vCPU CI machine
    ("swin_tiny", 224, 8, "float32"): 0.97,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper300", help="preset of configs/moby_swin_tiny.py to start from")
    parser.add_argument("--model", default=None, help="override config.model.name (default: the preset's)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: 8 for paper presets)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--parallelism", default="jit", choices=["jit", "pmap"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up/compile step)")
    parser.add_argument("--drop-path", type=float, default=None)
    args = parser.parse_args()

    import jax
    import numpy as np

    from swin_ssl.config_files import config_module
    moby_swin_tiny = config_module("moby_swin_tiny")
    from swin_ssl.train import loop, validate

    c = moby_swin_tiny.get_config(args.preset)
    if args.preset.startswith("paper"):
        c.batch_size = 8
    c.model.name = args.model or c.model.name
    c.model.dtype = args.dtype
    if args.image_size:
        c.data.image_size = args.image_size
    if args.batch:
        c.batch_size = args.batch
    if args.drop_path is not None:
        c.model.drop_path_rate = args.drop_path
    c.parallelism = args.parallelism
    c.data.name = "synthetic"
    c.data.data_dir = ""
    durations = validate.validate(c, device_count=jax.device_count(), process_count=jax.process_count())
    program = loop.build_program(c, durations)
    par = program.parallel

    rng = np.random.default_rng(0)
    size, batch = int(c.data.image_size), int(c.batch_size)
    host_batch = {v: rng.normal(size=(batch, size, size, 3)).astype(np.float32) for v in ("view1", "view2")}

    t0 = time.perf_counter()
    state = program.init(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = program.step(state, par.put_batch(host_batch))  # compiles
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0

    walls, cpus = [], []
    for _ in range(args.steps):
        device_batch = par.put_batch(host_batch)
        c0, t0 = time.process_time(), time.perf_counter()
        state, metrics = program.step(state, device_batch)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    loss = float(jax.device_get(metrics["loss"]))

    wall = statistics.median(walls)
    ips = batch / wall
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        memory = f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device peak ({dev.device_kind})"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host max RSS (process)"
    n_params = sum(x.size for x in jax.tree.leaves(state.params))

    print(f"\nMoBY step: {c.model.name} @ {size}px, global batch {batch} (x2 views), {c.model.dtype}, "
          f"heads {c.moby.proj_hidden_dim}->{c.moby.proj_dim}, queue {c.moby.queue_size}, "
          f"{jax.device_count()} x {dev.platform} ({c.parallelism}), {n_params:,} online params")
    print(f"init {init_s:.1f}s, first step (compile + run) {first_s:.1f}s, loss {loss:.4f}, "
          f"median of {args.steps} steps: {wall:.3f}s wall, {statistics.median(cpus):.3f}s CPU time")
    print(f"peak memory: {memory}")
    baseline = PYTORCH_BASELINE.get((c.model.name, size, batch, c.model.dtype))
    print()
    print(f"| {'implementation':<44} | {'img/s':>8} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 8}|")
    print(f"| {'swin_ssl (JAX ' + jax.__version__ + ', ' + dev.platform + ')':<44} | {ips:8.2f} | "
          f"{(ips / baseline if baseline else float('nan')):6.2f} |")
    if baseline:
        print(f"| {'official PyTorch MoBY (Transformer-SSL), CPU':<44} | {baseline:8.2f} | {1.0:6.2f} |")
    else:
        print("| (no PyTorch baseline for this setting)        |          |        |")


if __name__ == "__main__":
    main()

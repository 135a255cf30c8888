r"""MoBY train-step throughput and peak memory (the full step: EMA, online + target passes, loss, AdamW + clip).

Default: the official-size setting the PyTorch baseline was measured in -- Swin-T at 224 px, full heads
(4096 hidden, 256 out), queue 4096, AdamW + global-norm clip 5, fp32, batch 8 -- on whatever JAX sees::

    python benchmarks/moby_step.py                                   # CPU: + the PyTorch step, same run
    python benchmarks/moby_step.py --dtype bfloat16 --batch 64 --torch-python python3   # on a GPU, vs PyTorch AMP
    python benchmarks/moby_step.py --preset demo --steps 20          # the CPU demo's step (swin_nano, 32 px)

Images/s count images of the global batch (each image = two views) per optimizer step. With a Python that has
torch + timm (``--torch-python``, ``$SWIN_SSL_TORCH_PYTHON``, default /work/torchref/bin/python), a MoBY-shaped
PyTorch step around timm's Swin-T (``benchmarks/torch_reference.py``) runs in a subprocess and the two are timed
in alternating rounds (``--rounds`` x ``--steps``); the ratio of the medians is printed with the load average.
On a CUDA GPU the PyTorch step runs there too (bf16: under ``torch.autocast``). On an accelerator XLA's FLOP count
of the step (``step_flops.py``) gives the achieved FLOP/s and MFU (``device_figures.py``).
Wall-clock figures on shared machines are noisy: the CPU time per step (process time, all threads) is printed
too; compare ratios taken side by side, never single absolute numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


from device_figures import peak_memory_line, utilisation_line, xla_flops  # sibling files: benchmarks run as scripts
from torch_reference import (DEFAULT_PYTHON, TorchReference, available, print_comparison, reference_device,
                             timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper300", help="preset of configs/moby_swin_tiny.py to start from")
    parser.add_argument("--model", default=None, help="override config.model.name (default: the preset's)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: 8 for paper presets)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--parallelism", default="jit", choices=["jit", "pmap"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (after a warm-up/compile step)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, alternating with the PyTorch step")
    parser.add_argument("--torch-python", default=DEFAULT_PYTHON, help="a Python with torch + timm ('' to skip)")
    parser.add_argument("--drop-path", type=float, default=None)
    args = parser.parse_args()

    from swin_ssl import host_memory

    host_memory.keep_freed_memory_mapped()  # as train.py does, before JAX starts its backend
    import jax
    import numpy as np

    from swin_ssl.config_files import config_module
    moby_swin_tiny = config_module("moby_swin_tiny")
    from swin_ssl.train import program as program_lib, validate

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
    program = program_lib.build_program(c, durations)
    par = program.parallel

    rng = np.random.default_rng(0)
    size, batch = int(c.data.image_size), int(c.batch_size)
    host_batch = {v: rng.normal(size=(batch, size, size, 3)).astype(np.float32) for v in ("view1", "view2")}

    t0 = time.perf_counter()
    state = program.init(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step_fn, flops = program.step, float("nan")
    if c.parallelism == "jit":  # compile once, explicitly, to read XLA's FLOP count of the step
        lowered = program.step.lower(state, par.put_batch(host_batch))
        step_fn, flops = lowered.compile(), xla_flops(lowered)
    state, metrics = step_fn(state, par.put_batch(host_batch))
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0

    dev = jax.devices()[0]
    torch_device = reference_device(dev.platform, args.dtype, c.model.name)
    compare = torch_device and available(args.torch_python)
    reference = TorchReference(args.torch_python, "moby", batch=batch, size=size, device=torch_device,
                               dtype=args.dtype) if compare else None
    load0 = os.getloadavg()
    box = {"state": state}

    def one_step():
        box["state"], box["metrics"] = step_fn(box["state"], par.put_batch(host_batch))
        jax.block_until_ready(box["metrics"])

    ours, ref = {"walls": [], "cpus": []}, {"walls": [], "cpus": []}
    for _ in range(args.rounds):
        for k, v in timed(one_step, args.steps).items():
            ours[k] += v
        if reference:
            for k, v in reference.run(args.steps).items():
                ref[k] += v
    walls, cpus, state, metrics = ours["walls"], ours["cpus"], box["state"], box["metrics"]
    loss = float(jax.device_get(metrics["loss"]))

    wall = statistics.median(walls)
    ips = batch / wall
    memory = peak_memory_line()
    n_params = sum(x.size for x in jax.tree.leaves(state.params))

    print(f"\nMoBY step: {c.model.name} @ {size}px, global batch {batch} (x2 views), {c.model.dtype}, "
          f"heads {c.moby.proj_hidden_dim}->{c.moby.proj_dim}, queue {c.moby.queue_size}, "
          f"{jax.device_count()} x {dev.platform} ({c.parallelism}), {n_params:,} online params")
    print(f"init {init_s:.1f}s, first step (compile + run) {first_s:.1f}s, loss {loss:.4f}, "
          f"median of {len(walls)} steps: {wall:.3f}s wall, {statistics.median(cpus):.3f}s CPU time")
    print(f"peak memory: {memory}")
    if dev.platform != "cpu":
        print(utilisation_line(flops, wall, args.dtype))
    if reference:
        reference.close()
        print_comparison(f"swin_ssl (JAX {jax.__version__}, {dev.platform})", walls, cpus,
                         f"PyTorch MoBY-shaped step (torch {reference.info['torch']}, timm {reference.info['timm']})",
                         ref, batch, load0, ref_peak_gib=reference.info.get("peak_gib"))
    else:
        print(f"{ips:.2f} img/s; no same-run PyTorch comparison (needs swin_tiny, --torch-python, and float32 on "
              f"the CPU or a CUDA GPU)")

if __name__ == "__main__":
    main()

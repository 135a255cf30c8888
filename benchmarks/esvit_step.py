r"""EsViT train-step throughput and memory, and the memory of the region head with and without chunking.

Prints (on the devices JAX sees, the batch split over them: one CPU device here, or the GPUs/TPUs of a host):
  1. the full EsViT train step (student on 2 global + N local crops, teacher on the globals, view + region heads
     at ``--out_dim``, AdamW with per-parameter clipping, teacher EMA): compile time, step time, images/s
     (source images, each giving 2 + N crops), and the compiled program's memory (``memory_analysis()``:
     arguments, outputs, temporaries; plus the device's peak bytes in use where the runtime reports it);
  2. optionally (``--analyze_batch 32``) the same step compiled from shapes only at a larger batch: its memory;
  3. the region term alone (``head_dense`` forward + chunked loss + backward w.r.t. the head) compiled for
     each ``--chunks`` value (0 = one shot, no chunking) at ``--batch`` and at ``--region_batch``
     (default 32, the paper's per-GPU batch; compiled only, never run): its temporary memory.

With a Python that has torch + timm (``--torch-python``, default /work/torchref/bin/python), step 1 alternates
rounds with an EsViT-shaped PyTorch step around timm's Swin-T (``benchmarks/torch_reference.py``) and prints
the same-run ratio of the medians (swin_tiny; float32 on the CPU; on a CUDA GPU the PyTorch step runs there
too, bf16 under ``torch.autocast``) with the load average. On an accelerator XLA's FLOP count of the step
(``step_flops.py``) gives the achieved FLOP/s and MFU (``device_figures.py``).

Examples::

    python benchmarks/esvit_step.py                                  # Swin-T, 2x224 + 8x96, batch 2, fp32, CPU
    python benchmarks/esvit_step.py --dtype bfloat16 --batch 32 --skip_region --torch-python python3  # a GPU
    python benchmarks/esvit_step.py --skip_step --chunks 0 17 --region_batch 64   # region memory only
    python benchmarks/esvit_step.py --skip_step --skip_region --analyze_batch 32  # step memory, with/without remat
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from swin_ssl import host_memory  # noqa: E402
from swin_ssl.config_files import config_module  # noqa: E402

esvit_swin_tiny = config_module("esvit_swin_tiny")
from swin_ssl.objectives import dino  # noqa: E402
from swin_ssl.train.program import build_program  # noqa: E402
from swin_ssl.train.validate import durations as durations_of  # noqa: E402
from device_figures import peak_memory_line, utilisation_line, xla_flops  # sibling files: benchmarks run as scripts
from torch_reference import (DEFAULT_PYTHON, TorchReference, available, print_comparison, reference_device,
                             timed)

MiB = 2 ** 20


def build_config(args):
    c = esvit_swin_tiny.get_config("paper300")
    c.model.name = args.model
    c.model.dtype = args.dtype
    if args.model.startswith("swin_") and args.model not in ("swin_tiny", "swin_small", "swin_base", "swin_large"):
        c.model.overrides = dict(norm_eps=1e-6)
    else:
        c.model.overrides.window_size = args.window
    c.data.image_size = args.global_size
    c.data.local_size = args.local_size
    c.data.num_local_crops = args.num_local
    esvit_swin_tiny.set_batch_size(c, args.batch)
    c.dino.out_dim = args.out_dim
    c.dino.region_chunk_size = args.chunk
    if args.remat:
        c.model.remat = True
    c.parallelism = "jit"
    return c


def fake_batch(c, batch):
    rng = np.random.default_rng(0)
    out = {f"global{i}": rng.normal(size=(batch, c.data.image_size, c.data.image_size, 3)) for i in range(2)}
    out.update({f"local{i}": rng.normal(size=(batch, c.data.local_size, c.data.local_size, 3))
                for i in range(c.data.num_local_crops)})
    return {k: v.astype(np.float32) for k, v in out.items()}


def memory_line(compiled) -> str:
    m = compiled.memory_analysis()
    if m is None:
        return "memory_analysis unavailable"
    return (f"arguments {m.argument_size_in_bytes / MiB:9.1f} MiB | outputs {m.output_size_in_bytes / MiB:9.1f} MiB | "
            f"temporaries {m.temp_size_in_bytes / MiB:9.1f} MiB | aliased {m.alias_size_in_bytes / MiB:.1f} MiB")


def bench_step(args):
    c = build_config(args)
    program = build_program(c, durations_of(c))
    state = program.init(jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    batch = program.parallel.put_batch(fake_batch(c, args.batch))
    t = time.time()
    lowered = program.step.lower(state, batch)
    compiled, flops = lowered.compile(), xla_flops(lowered)
    compile_s = time.time() - t
    print(f"\n[step] {args.model} {args.dtype}, batch {args.batch}, 2x{args.global_size} + {args.num_local}x"
          f"{args.local_size}, out_dim {args.out_dim}, region chunk {args.chunk}, {n_params / 1e6:.1f}M student "
          f"params, device {jax.devices()[0].device_kind}")
    print(f"  compile {compile_s:.1f}s; {memory_line(compiled)}")
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    torch_device = reference_device(jax.devices()[0].platform, args.dtype, args.model)
    compare = torch_device and available(args.torch_python)
    reference = TorchReference(args.torch_python, "esvit", batch=args.batch, size=args.global_size,
                               local_size=args.local_size, num_local=args.num_local, out_dim=args.out_dim,
                               device=torch_device, dtype=args.dtype) if compare else None
    load0 = os.getloadavg()
    box = {"state": state}

    def one_step():
        box["state"], box["metrics"] = compiled(box["state"], batch)
        jax.block_until_ready(box["metrics"])

    ours, ref = {"walls": [], "cpus": []}, {"walls": [], "cpus": []}
    for _ in range(args.rounds):
        for k, v in timed(one_step, args.steps).items():
            ours[k] += v
        if reference:
            for k, v in reference.run(args.steps).items():
                ref[k] += v
    times, cpu, metrics = ours["walls"], ours["cpus"], box["metrics"]
    sec = float(np.median(times))
    crops = 2 + args.num_local
    print(f"  step {sec * 1000:.0f} ms wall (median of {len(times)}) -> {args.batch / sec:.2f} images/s "
          f"({args.batch * crops / sec:.1f} crops/s); {float(np.median(cpu)):.1f} CPU-s of this process per step "
          f"(host load matters on shared CPUs); loss {float(metrics['loss']):.4f}")
    if reference:
        reference.close()
        print_comparison(f"swin_ssl (JAX {jax.__version__})", times, cpu,
                         f"PyTorch EsViT-shaped step (torch {reference.info['torch']}, timm {reference.info['timm']})",
                         ref, args.batch, load0, ref_peak_gib=reference.info.get("peak_gib"))
    print(f"  peak memory: {peak_memory_line()}")
    if jax.devices()[0].platform != "cpu":
        print(f"  {utilisation_line(flops, sec, args.dtype)}")


def analyze_step(args, batch: int):
    """Compile (never run) the full step at ``batch`` from shapes only and print its memory analysis, without and
    with block rematerialisation (``model.remat``), and the ratio of their temporaries."""
    temps = {}
    for remat in (False, True):
        temps[remat] = analyze_one(argparse.Namespace(**{**vars(args), "remat": remat}), batch)
    if temps[False] and temps[True]:
        print(f"  remat: temporaries x{temps[True] / temps[False]:.2f} "
              f"({temps[False] / MiB:.0f} -> {temps[True] / MiB:.0f} MiB)")


def analyze_one(args, batch: int) -> float | None:
    c = build_config(args)
    esvit_swin_tiny.set_batch_size(c, batch)
    program = build_program(c, durations_of(c))
    state = jax.eval_shape(program.init, jax.random.PRNGKey(0))
    shapes = {f"global{i}": (batch, args.global_size, args.global_size, 3) for i in range(2)}
    shapes.update({f"local{i}": (batch, args.local_size, args.local_size, 3) for i in range(args.num_local)})
    batch_shapes = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    t = time.time()
    compiled = program.step.lower(state, batch_shapes).compile()
    print(f"\n[step, compiled only] {args.model} {args.dtype}, batch {batch}, region chunk {args.chunk}, "
          f"remat {args.remat}: {memory_line(compiled)} (compile {time.time() - t:.0f}s)")
    m = compiled.memory_analysis()
    return None if m is None else float(m.temp_size_in_bytes)


def region_temp_bytes(args, batch: int, chunk: int, tokens_per_image: int, teacher_tokens: int) -> tuple[float, float]:
    """Temporaries of value_and_grad(head_dense + region loss) w.r.t. the head, compiled from shapes only."""
    c = build_config(args)
    student, _, head = dino.build_networks(c)
    dim = student.num_features
    head_params = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.zeros((1, dim))))["params"]
    weights = dino.region_pair_weights([teacher_tokens // 2] * 2 + [(tokens_per_image - teacher_tokens) //
                                                                    args.num_local] * args.num_local, 2)

    def f(p, tokens, probs, idx):
        return jax.value_and_grad(lambda p: dino.region_loss_chunked(
            lambda x: head.apply({"params": p}, x), tokens, probs, idx, weights, 0.1, chunk))(p)

    shapes = (head_params, jax.ShapeDtypeStruct((batch, tokens_per_image, dim), jnp.float32),
              jax.ShapeDtypeStruct((batch, teacher_tokens, args.out_dim), jnp.float32),
              jax.ShapeDtypeStruct((batch, tokens_per_image, 2), jnp.int32))
    m = jax.jit(f).lower(*shapes).compile().memory_analysis()
    return m.temp_size_in_bytes / MiB, m.argument_size_in_bytes / MiB


def bench_region(args):
    # Tokens per image after the last stage (Swin patch 4, 3 halvings: /32; padded maps round up).
    if args.model not in ("swin_tiny", "swin_small", "swin_base"):
        print("\n[region] only for swin_tiny/small/base (patch 4, 4 stages: tokens = ceil(size / 32)^2)")
        return
    g, loc = -(-args.global_size // 32), -(-args.local_size // 32)
    teacher_tokens = 2 * g * g
    tokens = teacher_tokens + args.num_local * loc * loc
    print(f"\n[region] head_dense + region loss + backward, out_dim {args.out_dim}, {tokens} student tokens/image "
          f"(2x{g * g} + {args.num_local}x{loc * loc}), {teacher_tokens} teacher tokens/image")
    for batch in sorted({args.batch, args.region_batch}):
        for chunk in args.chunks:
            temp, argsz = region_temp_bytes(args, batch, chunk, tokens, teacher_tokens)
            label = "one shot" if chunk <= 0 else f"chunk {chunk:3d}"
            print(f"  batch {batch:3d} {label:>9}: temporaries {temp:9.1f} MiB (inputs incl. teacher targets "
                  f"{argsz:8.1f} MiB)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="swin_tiny")
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--global_size", type=int, default=224)
    p.add_argument("--local_size", type=int, default=96)
    p.add_argument("--num_local", type=int, default=8)
    p.add_argument("--out_dim", type=int, default=65536)
    p.add_argument("--chunk", type=int, default=17, help="region_chunk_size of the step benchmark (0: one shot)")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 34, 17, 10])
    p.add_argument("--region_batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds, alternating with the PyTorch step")
    p.add_argument("--torch-python", default=DEFAULT_PYTHON, help="a Python with torch + timm ('' to skip)")
    p.add_argument("--analyze_batch", type=int, default=0,
                   help="also compile (not run) the full step at this batch and print its memory analysis")
    p.add_argument("--remat", action="store_true", help="rematerialise each backbone block (step benchmark)")
    p.add_argument("--skip_step", action="store_true")
    p.add_argument("--skip_region", action="store_true")
    args = p.parse_args()
    host_memory.keep_freed_memory_mapped()  # as train.py does, before JAX starts its backend
    for name in ("batch", "analyze_batch"):
        if getattr(args, name) % jax.device_count():
            p.error(f"--{name}={getattr(args, name)} must divide over the {jax.device_count()} devices JAX sees")
    if not args.skip_step:
        bench_step(args)
    if args.analyze_batch:
        analyze_step(args, args.analyze_batch)
    if not args.skip_region:
        bench_region(args)


if __name__ == "__main__":
    main()

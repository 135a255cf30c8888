"""Backbone throughput: forward and forward+backward images/s, parameters and GFLOPs, as a paper-style row.

    python benchmarks/throughput.py --model swin_tiny --batch 8 --res 224 --dtype float32
    python benchmarks/throughput.py --rounds 5          # + timm's PyTorch model, same run, alternating rounds

GFLOPs come from XLA's cost analysis of the compiled forward (multiply-adds count 2 FLOPs; the Swin paper's
"4.5G" counts multiply-accumulates, so expect about twice its figure). With a Python that has torch +
timm (``--timm-python``, ``$SWIN_SSL_TORCH_PYTHON``, default /work/torchref/bin/python), the same model is timed
in timm (eval mode, same batch/resolution, all cores) in live subprocesses, in rounds alternating with ours;
the medians over the rounds, their ratio (wall and CPU time) and the load average are printed: both run on
the same noisy machine in the same minutes. ``--one-core`` pins both sides to one CPU with one thread each
(a per-core ratio, less sensitive to other jobs than two threads contending for two shared cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from torch_reference import DEFAULT_PYTHON, TorchReference, available, timed  # a sibling file: benchmarks run as scripts
from device_figures import PEAK_CALLS, PEAK_SIZE, matmul_peak, xla_flops  # a sibling file

TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_small": "swin_small_patch4_window7_224",
              "swin_base": "swin_base_patch4_window7_224", "deit_small": "deit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}


def build_jax(model_name: str, batch: int, res: int, dtype: str):
    """(forward, forward+backward, info): compiled and run once."""
    import jax
    import jax.numpy as jnp

    from swin_ssl.models import create_model

    model = create_model(model_name, num_classes=1000, dtype=getattr(jnp, dtype))
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, res, res, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def loss(p, x):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, x)[0])[:, 0])

    grad = jax.jit(jax.grad(loss))
    flops = xla_flops(forward.lower(params, x))
    fns = (lambda: forward(params, x).block_until_ready(), lambda: jax.block_until_ready(grad(params, x)))
    for fn in fns:
        fn()
    info = {"params": sum(p.size for p in jax.tree.leaves(params)), "gflops_per_img": flops / batch / 1e9,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    return fns, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=2, help="calls per round and side")
    parser.add_argument("--rounds", type=int, default=5, help="rounds alternating with timm; medians reported")
    parser.add_argument("--timm-python", default=DEFAULT_PYTHON, help="a Python with torch + timm ('' to skip)")
    parser.add_argument("--one-core", action="store_true", help="pin both sides to one CPU, one thread each")
    args = parser.parse_args()
    if args.one_core:  # before JAX starts its thread pool; the timm subprocesses inherit the affinity
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"

    from swin_ssl import host_memory

    host_memory.keep_freed_memory_mapped()  # as train.py does, before JAX starts its backend
    (fwd, fwdbwd), info = build_jax(args.model, args.batch, args.res, args.dtype)
    compare = bool(args.timm_python) and available(args.timm_python) and args.dtype == "float32" \
        and args.model in TIMM_NAMES
    refs = {}
    if compare:
        for what in ("fwd", "fwdbwd"):
            refs[what] = TorchReference(args.timm_python, "backbone", name=TIMM_NAMES[args.model], batch=args.batch,
                                        res=args.res, backward=what == "fwdbwd")
    load0 = os.getloadavg()
    ours = {w: {"walls": [], "cpus": []} for w in ("fwd", "fwdbwd")}
    theirs = {w: {"walls": [], "cpus": []} for w in refs}
    for _ in range(args.rounds):
        for what, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            for k, v in timed(fn, args.iters).items():
                ours[what][k] += v
            if what in refs:
                for k, v in refs[what].run(args.iters).items():
                    theirs[what][k] += v
    for r in refs.values():
        r.close()
    peak = matmul_peak(args.dtype, size=PEAK_SIZE["cpu"]) / 1e9
    med = lambda d, w, k="walls": statistics.median(d[w][k])  # noqa: E731
    print(f"\n{args.model} @ {args.res}px, batch {args.batch}, {args.dtype}, device: {info['device']}, "
          f"{len(os.sched_getaffinity(0))} CPU(s); "
          f"medians of {args.rounds} rounds x {args.iters} calls; load average {load0[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print("| implementation | params | GFLOPs/img (XLA) | forward img/s | fwd+bwd img/s |")
    print("|---|---|---|---|---|")
    print(f"| swin_ssl (JAX {info['jax']}) | {info['params'] / 1e6:.2f}M | {info['gflops_per_img']:.2f} | "
          f"{args.batch / med(ours, 'fwd'):.2f} | {args.batch / med(ours, 'fwdbwd'):.2f} |")
    flops = info["gflops_per_img"] * args.batch
    print(f"matmul peak ({args.dtype}, {PEAK_SIZE['cpu']}^3, best of {PEAK_CALLS}): {peak:.0f} GFLOP/s; achieved "
          f"(XLA's forward count, fwd+bwd as 3x): forward {flops / med(ours, 'fwd') / peak:.0%}, "
          f"fwd+bwd {3 * flops / med(ours, 'fwdbwd') / peak:.0%} of it")
    if refs:
        v = refs["fwd"].info
        print(f"| timm {v['timm']} / torch {v['torch']} | | - | {args.batch / med(theirs, 'fwd'):.2f} | "
              f"{args.batch / med(theirs, 'fwdbwd'):.2f} |")
        for k, label in (("walls", "wall"), ("cpus", "CPU time")):
            print(f"| ratio JAX / timm ({label}) | | | {med(theirs, 'fwd', k) / med(ours, 'fwd', k):.2f}x | "
                  f"{med(theirs, 'fwdbwd', k) / med(ours, 'fwdbwd', k):.2f}x |")
    elif args.dtype == "float32":
        print(f"(no timm comparison: no torch + timm at {args.timm_python!r})")


if __name__ == "__main__":
    main()

"""Backbone throughput: forward and forward+backward images/s, parameters and GFLOPs, as a paper-style row.

    python benchmarks/throughput.py --model swin_tiny --batch 8 --res 224 --dtype float32
    python benchmarks/throughput.py --timm-python /work/torchref/bin/python   # + timm's PyTorch Swin-T, same run

GFLOPs come from XLA's cost analysis of the compiled forward (multiply-adds count 2 FLOPs; the Swin paper's
"4.5G" counts multiply-accumulates, so expect about twice its figure). With ``--timm-python`` the same model
is timed in timm (PyTorch, eval mode, same batch/resolution, same thread count) in a subprocess interleaved
with ours, and the ratio is printed: both run on the same noisy machine in the same minute.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_small": "swin_small_patch4_window7_224",
              "swin_base": "swin_base_patch4_window7_224", "deit_small": "deit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}


def time_fn(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure_jax(model_name: str, batch: int, res: int, dtype: str, warmup: int, iters: int) -> dict:
    import jax
    import jax.numpy as jnp

    from swin_ssl.models import create_model

    model = create_model(model_name, num_classes=1000, dtype=getattr(jnp, dtype))
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, res, res, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]
    n_params = sum(p.size for p in jax.tree.leaves(params))

    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def loss(p, x):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, x)[0]) [:, 0])

    grad = jax.jit(jax.grad(loss))
    flops = forward.lower(params, x).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, (list, tuple)) else flops).get("flops", float("nan"))
    fwd = time_fn(lambda: forward(params, x).block_until_ready(), warmup, iters)
    bwd = time_fn(lambda: jax.block_until_ready(grad(params, x)), warmup, iters)
    return {"params": int(n_params), "gflops_per_img": flops / batch / 1e9,
            "fwd_img_s": batch / float(np.median(fwd)), "fwdbwd_img_s": batch / float(np.median(bwd)),
            "device": str(jax.devices()[0].device_kind)}


TIMM_SCRIPT = textwrap.dedent("""
    import json, sys, time, warnings
    warnings.filterwarnings("ignore")
    import numpy as np, torch, timm
    name, batch, res, warmup, iters, threads = sys.argv[1], *map(int, sys.argv[2:7])
    torch.set_num_threads(threads)
    m = timm.create_model(name, pretrained=False, num_classes=1000, img_size=res).eval()
    x = torch.randn(batch, 3, res, res)
    def run(fn):
        for _ in range(warmup): fn()
        ts = []
        for _ in range(iters):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        return batch / float(np.median(ts))
    def fwd():
        with torch.no_grad(): m(x)
    def fwdbwd():
        m.zero_grad(); torch.log_softmax(m(x), -1)[:, 0].mean().backward()
    print(json.dumps({"fwd_img_s": run(fwd), "fwdbwd_img_s": run(fwdbwd), "params": sum(p.numel() for p in m.parameters()),
                      "torch": torch.__version__, "timm": timm.__version__}))
""")


def measure_timm(python: str, model_name: str, batch: int, res: int, warmup: int, iters: int) -> dict | None:
    if model_name not in TIMM_NAMES:
        return None
    threads = os.cpu_count() or 1
    out = subprocess.run([python, "-c", TIMM_SCRIPT, TIMM_NAMES[model_name], str(batch), str(res), str(warmup),
                          str(iters), str(threads)], capture_output=True, text=True, check=False)
    if out.returncode:
        print(f"timm run failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved JAX/timm rounds; the best round is kept")
    parser.add_argument("--timm-python", default=os.environ.get("SWIN_SSL_TIMM_PYTHON", "/work/torchref/bin/python"),
                        help="a python with torch + timm (a separate CPU torch environment)")
    args = parser.parse_args()

    have_timm = os.path.exists(args.timm_python)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(measure_jax(args.model, args.batch, args.res, args.dtype, args.warmup, args.iters))
        if have_timm and args.dtype == "float32":
            t = measure_timm(args.timm_python, args.model, args.batch, args.res, args.warmup, args.iters)
            if t:
                theirs.append(t)
    best = max(ours, key=lambda r: r["fwd_img_s"])
    print(f"\n{args.model} @ {args.res}px, batch {args.batch}, {args.dtype}, device: {best['device']}")
    print("| implementation | params | GFLOPs/img (XLA) | forward img/s | fwd+bwd img/s |")
    print("|---|---|---|---|---|")
    print(f"| swin_ssl (JAX) | {best['params'] / 1e6:.2f}M | {best['gflops_per_img']:.2f} | "
          f"{best['fwd_img_s']:.2f} | {max(r['fwdbwd_img_s'] for r in ours):.2f} |")
    if theirs:
        tf_ = max(t["fwd_img_s"] for t in theirs)
        tb = max(t["fwdbwd_img_s"] for t in theirs)
        print(f"| timm {theirs[0]['timm']} / torch {theirs[0]['torch']} | {theirs[0]['params'] / 1e6:.2f}M | - | "
              f"{tf_:.2f} | {tb:.2f} |")
        print(f"| ratio JAX / timm | | | {best['fwd_img_s'] / tf_:.2f}x | "
              f"{max(r['fwdbwd_img_s'] for r in ours) / tb:.2f}x |")
    elif args.dtype == "float32":
        print(f"(no timm comparison: {args.timm_python} not found; pass --timm-python, a python with torch + "
              "timm)")


if __name__ == "__main__":
    main()

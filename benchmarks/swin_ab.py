r"""The Swin backbone of a git revision against the working tree's, in one process, alternating rounds.

Loads ``swin_ssl/models/swin.py`` as it is at ``--ref`` (``git show``) next to the working tree's copy, builds
the same model from both with the same parameters, checks that the outputs agree, and times forward and
forward+backward alternately (``--rounds`` rounds of ``--iters`` calls each; medians)::

    python benchmarks/swin_ab.py --ref HEAD~3 --rounds 5
    python benchmarks/swin_ab.py --ref main --model swin_tiny --batch 8 --res 224

Both programs run in the same minute on the same (possibly shared) cores, so the ratio is meaningful
where absolute images/s are not; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np
from torch_reference import timed  # a sibling file: benchmarks run as scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIN = "swin_ssl/models/swin.py"
CONFIGS = {"swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
           "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))}


def load_module(name: str, source: str):
    """Import ``source`` (the text of swin.py, which imports only jax/flax/numpy) as module ``name``."""
    path = os.path.join(tempfile.mkdtemp(prefix="swin_ab_"), f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Flax modules) look their module up here
    spec.loader.exec_module(module)
    return module


def programs(module, model_name: str, params, x):
    import jax
    import jax.numpy as jnp

    model = module.SwinTransformer(num_classes=1000, **CONFIGS[model_name])
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, x)[0])[:, 0])))
    return (lambda: jax.block_until_ready(forward(params, x)),
            lambda: jax.block_until_ready(grad(params, x)), model)


def median_timed(fn, iters: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds per call."""
    t = timed(fn, iters)
    return float(np.median(t["walls"])), float(np.median(t["cpus"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="HEAD")
    parser.add_argument("--model", default="swin_tiny", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()
    from swin_ssl import host_memory

    host_memory.keep_freed_memory_mapped()  # both sides alike, as train.py does, before JAX starts its backend
    import jax

    old = load_module("swin_ref", subprocess.check_output(["git", "show", f"{args.ref}:{SWIN}"], cwd=ROOT, text=True))
    new = load_module("swin_new", open(os.path.join(ROOT, SWIN)).read())
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.res, args.res, 3))
    model = new.SwinTransformer(num_classes=1000, **CONFIGS[args.model])
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]
    sides = {"ref": programs(old, args.model, params, x), "new": programs(new, args.model, params, x)}
    outs = {k: np.asarray(v[0]()) for k, v in sides.items()}
    print(f"max |logits new - ref| = {np.abs(outs['new'] - outs['ref']).max():.3g}")
    for fwd, bwd, _ in sides.values():
        bwd()  # compile
    load0 = os.getloadavg()
    rows = {k: {"fwd": [], "fwdbwd": []} for k in sides}
    for _ in range(args.rounds):
        for k, (fwd, bwd, _) in sides.items():
            rows[k]["fwd"].append(median_timed(fwd, args.iters))
            rows[k]["fwdbwd"].append(median_timed(bwd, args.iters))
    print(f"{args.model}, batch {args.batch}, {args.res}px, {args.rounds} alternating rounds x {args.iters} calls; "
          f"load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    for what in ("fwd", "fwdbwd"):
        (ref, ref_cpu), (cur, cur_cpu) = (np.median(rows[k][what], axis=0) for k in ("ref", "new"))
        print(f"  {what:7s} ref {args.batch / ref:6.2f} img/s | new {args.batch / cur:6.2f} img/s | "
              f"new/ref {ref / cur:.2f}x wall, {ref_cpu / cur_cpu:.2f}x CPU time")


if __name__ == "__main__":
    main()

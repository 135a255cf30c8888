r"""Where a compiled step spends its time: per-HLO-op times from a ``jax.profiler`` trace, grouped.

Runs the Swin-T forward+backward (``--what fwdbwd``, the loss of ``benchmarks/throughput.py``) or the full MoBY
train step (``--what moby``, the step of ``benchmarks/moby_step.py``), traces ``--iters`` executions, and joins
each executed op (XLA:CPU emits one trace event per thunk, named by its HLO instruction) with the optimised HLO
that XLA dumps, so every op gets the JAX operation and Flax module it came from. Prints the top ops and the
shares by kind (matmul, elementwise, transpose/copy, reduce, scatter/gather, ...) and by direction
(forward or backward)::

    python benchmarks/profile_ops.py --what fwdbwd --iters 3
    python benchmarks/profile_ops.py --what moby --iters 2 --top 25

Shares are of the summed op time (ops of one step can run on both cores at once, so the sum can exceed the wall
time). The dump goes to a temporary folder.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMP = tempfile.mkdtemp(prefix="swin_ssl_hlo_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$").strip()

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"")


def op_names(module: str) -> dict[str, str]:
    """HLO instruction name -> JAX op_name metadata, from the largest optimised dump of ``module``."""
    files = glob.glob(os.path.join(DUMP, f"*.{module}.*after_optimizations.txt"))
    if not files:
        return {}
    text = open(max(files, key=os.path.getsize)).read()
    return {m.group(1): m.group(2) for m in map(INSTRUCTION.match, text.splitlines()) if m}


def kind_of(hlo_op: str, jax_op: str) -> str:
    """A coarse category from the HLO instruction name (what XLA made of it) and the JAX primitive."""
    prim = jax_op.rsplit("/", 1)[-1]
    if hlo_op.startswith(("ynn_fusion", "dot", "convolution")) or "dot_general" in prim or "conv" in prim:
        return "matmul/conv"
    if "scatter" in hlo_op or "scatter" in prim:
        return "scatter"
    if "gather" in hlo_op or prim in ("gather", "take"):
        return "gather"
    if hlo_op.startswith(("copy", "transpose")) or prim in ("transpose", "copy", "roll", "concatenate", "pad",
                                                            "slice", "dynamic_slice", "rev"):
        return "transpose/copy/pad"
    if "reduce" in hlo_op or prim.startswith("reduce") or prim in ("argmax", "cumsum"):
        return "reduce"
    return "elementwise/other"


def module_path(jax_op: str) -> str:
    """Flax module path and JAX primitive, stage/block numbers folded (``blocks_*/attn/exp``)."""
    parts = [p for p in jax_op.split("/")[1:] if not p.startswith(("jvp(", "transpose(", "jit(", "vmap("))]
    return re.sub(r"_\d+", "_*", "/".join(parts)).replace("layers_*/", "") or "(top level)"


def collect(trace_dir: str) -> list[tuple[str, str, float]]:
    """(module, hlo_op, microseconds) of every op event in the trace."""
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [(e["args"]["hlo_module"], e["args"]["hlo_op"], float(e["dur"])) for e in events
            if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]


def report(events: list[tuple[str, str, float]], iters: int, top: int) -> None:
    names = {m: op_names(m) for m in {m for m, _, _ in events}}
    per_op, kinds, direction, modules = (collections.Counter() for _ in range(4))
    for module, op, us in events:
        jax_op = names[module].get(op, "")
        per_op[(op, jax_op)] += us
        kinds[kind_of(op, jax_op)] += us
        direction["backward" if "transpose(" in jax_op else "forward"] += us
        modules[module_path(jax_op)] += us
    total = sum(per_op.values())
    print(f"summed op time {total / 1e3 / iters:.0f} ms per step over {iters} traced steps")
    for title, counter in (("kind", kinds), ("direction", direction)):
        print(f"\n| {title} | ms/step | share |\n|---|---|---|")
        for k, v in counter.most_common():
            print(f"| {k} | {v / 1e3 / iters:.1f} | {100 * v / total:.1f}% |")
    print("\n| module/primitive (blocks folded) | ms/step | share |\n|---|---|---|")
    for k, v in modules.most_common(top):
        print(f"| {k} | {v / 1e3 / iters:.1f} | {100 * v / total:.1f}% |")
    print(f"\n| HLO op | JAX op | kind | ms/step | share |\n|---|---|---|---|---|")
    for (op, jax_op), v in per_op.most_common(top):
        short = "/".join(p for p in jax_op.split("/")[1:] if p)[-70:]
        print(f"| {op} | {short} | {kind_of(op, jax_op)} | {v / 1e3 / iters:.1f} | {100 * v / total:.1f}% |")


def swin_fwdbwd(batch: int, res: int):
    import jax
    import jax.numpy as jnp

    from swin_ssl.models import create_model

    model = create_model("swin_tiny", num_classes=1000)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, res, res, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]

    def loss(p, x):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, x)[0])[:, 0])

    grad = jax.jit(jax.grad(loss))
    return lambda: jax.block_until_ready(grad(params, x))


def moby_step(batch: int, res: int):
    import jax
    import numpy as np

    from swin_ssl.config_files import config_module
    from swin_ssl.train import program as program_lib, validate

    moby_swin_tiny = config_module("moby_swin_tiny")

    c = moby_swin_tiny.get_config("paper300")
    c.batch_size, c.data.image_size, c.data.name, c.data.data_dir = batch, res, "synthetic", ""
    program = program_lib.build_program(c, validate.validate(c, device_count=jax.device_count(),
                                                             process_count=jax.process_count()))
    rng = np.random.default_rng(0)
    host = {v: rng.normal(size=(batch, res, res, 3)).astype(np.float32) for v in ("view1", "view2")}
    box = {"state": program.init(jax.random.PRNGKey(0))}

    def run():
        box["state"], metrics = program.step(box["state"], program.parallel.put_batch(host))
        jax.block_until_ready(metrics)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="fwdbwd", choices=["fwdbwd", "moby"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    from swin_ssl import host_memory

    host_memory.keep_freed_memory_mapped()  # as train.py does, before JAX starts its backend
    import jax

    run = (swin_fwdbwd if args.what == "fwdbwd" else moby_step)(args.batch, args.res)
    for _ in range(2):  # compile, then one warm run
        run()
    trace_dir = tempfile.mkdtemp(prefix="swin_ssl_trace_")
    t = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.iters):
            run()
    wall = (time.perf_counter() - t) / args.iters
    print(f"{args.what}: batch {args.batch}, {args.res}px, {wall:.2f} s/step wall while tracing, "
          f"load average {os.getloadavg()[0]:.2f}")
    report(collect(trace_dir), args.iters, args.top)


if __name__ == "__main__":
    main()

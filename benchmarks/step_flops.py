r"""XLA's FLOP count of one train step of a config: the cost analysis of the lowered (not yet optimised) HLO,
which is the same program on every backend, so a step time measured on a GPU or TPU becomes MFU even where that
backend's analysis gives no count. Only traces and lowers (seconds); nothing is compiled or run::

    python benchmarks/step_flops.py --config configs/moby_swin_tiny.py:paper300 --batch 64 --dtype bfloat16
    python benchmarks/step_flops.py --config configs/esvit_swin_tiny.py:paper300 --batch 32 --dtype bfloat16 \
        --seconds 0.0642 --peak 989e12     # also: achieved FLOP/s and MFU for a measured step time
"""
from __future__ import annotations

import argparse
import os

from device_figures import xla_flops  # a sibling file: benchmarks run as scripts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/moby_swin_tiny.py:paper300")
    parser.add_argument("--batch", type=int, required=True, help="global batch (one device)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--seconds", type=float, default=None, help="a measured step time")
    parser.add_argument("--peak", type=float, default=None, help="the device's peak FLOP/s, for MFU")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # some accelerator backends give no count (jax 0.11.2 on GPUs)
    import jax

    from swin_ssl.config_files import load_config
    from swin_ssl.train import data, program, validate

    c = load_config(args.config)
    c.batch_size, c.model.dtype = args.batch, args.dtype
    c.data.name, c.data.data_dir, c.parallelism = "synthetic", "", "jit"
    prog = program.build_program(c, validate.durations(c))
    state = jax.eval_shape(prog.init, jax.random.PRNGKey(0))
    batch = next(data.make_train_iterator(c, process_index=0, process_count=1, start_step=0))
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    flops = xla_flops(prog.step.lower(state, shapes))
    print(f"{args.config} batch {args.batch} {args.dtype}: {flops / 1e12:.3f} TFLOP per step (XLA, lowered HLO, "
          f"JAX {jax.__version__})")
    if args.seconds:
        line = f"at {args.seconds * 1e3:.1f} ms/step: {flops / args.seconds / 1e12:.1f} TFLOP/s"
        if args.peak:
            line += f", MFU {flops / args.seconds / args.peak:.1%} of {args.peak / 1e12:.0f} TFLOP/s"
        print(line)


if __name__ == "__main__":
    main()

r"""Fashion-MNIST quality benchmark: does self-supervised pretraining of a tiny Swin beat the baselines?

Pretrains ``swin_nano`` with MoBY and with EsViT through the trainer library (``--preset``, default ``fmnist30``:
``configs/moby_swin_tiny.py:fmnist30``, 5500 steps, and ``configs/esvit_swin_tiny.py:fmnist30``, 4800 steps, each
sized for a 30-minute budget on 2 idle cores; a config without the preset uses its ``demo``; ``--steps``
changes the length), then evaluates on the 10k test set, with the 60k training images as k-NN bank / linear-probe
data:

  raw pixels       the 784 raw intensities (published cosine k-NN baseline: 85.8 % k=1, 84.6 % k=20)
  random init      swin_nano at initialisation (same architecture, no training)
  MoBY             the online encoder (MoBY's evaluation network)
  EsViT            the EMA teacher (EsViT's evaluation network)

Columns: k-NN top-1 (k=1, 20; DINO weighted vote, T=0.07, pooled feature), linear top-1 with the EsViT protocol
(last-4-blocks concatenation, SGD momentum, plain CE) and with the MoBY protocol (pooled feature, Nesterov,
label smoothing 0.1, warmup 5, clip 5), each on cached centre-crop features with a small vmapped lr sweep (best
test accuracy over epochs and lrs, as the papers report -- optimistic; the augmenting protocol is the faithful
one and is not run here for time), and wall-clock seconds per stage. A benchmark, not a test: nothing asserts.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/fmnist.py --workdir runs/fmnist_bench
    ... --objectives moby --knn_every 1100     # MoBY only, with the in-training k-NN learning curve (README run)
    ... --objectives moby --steps 200 --linear_epochs 30 --train_examples 20000    # quicker
    ... --skip_pretrain      # evaluate the checkpoints already in --workdir/{moby,esvit}
    ... --set optim.base_lr=0.004     # any training-config field

Pretraining resumes from ``--workdir/<objective>`` when a checkpoint is there (a finished run is not repeated).
Results: printed table and ``--workdir/fmnist_results.json``.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {"moby": "configs/moby_swin_tiny.py", "esvit": "configs/esvit_swin_tiny.py"}
LINEAR_LRS = {"esvit": (1e-3, 1e-2, 1e-1, 1.0, 10.0), "moby": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)}  # base lrs (per 256 / 512)


def load_train_config(objective: str, steps: int | None, preset: str = "fmnist30", knn_every: int = 0,
                      overrides: dict | None = None):
    from swin_ssl.config_files import config_module
    module = config_module(os.path.splitext(os.path.basename(CONFIGS[objective]))[0])
    if preset not in module.PRESETS:
        print(f"{CONFIGS[objective]} has no preset {preset!r}; using 'demo'", flush=True)
        preset = "demo"
    config = module.get_config(preset)
    config.update_from_flattened_dict(overrides or {})  # unknown keys fail here
    if knn_every:  # learning curve: in-training k-NN (online/teacher network) on a 10k bank / the 10k test set
        config.evals.every_steps = int(knn_every)
        config.evals.fn = "swin_ssl.evaluators.knn:in_training_knn"
        config.evals.kwargs = dict(ks=(1, 20), train_examples=10_000, test_examples=None)
    if steps:
        config.total_steps = int(steps)
        config.warmup_steps = min(int(config.warmup_steps or 0), max(int(steps) // 10, 1))
        if config.optim.get("freeze_steps") is not None:
            config.optim.freeze_steps = min(int(config.optim.freeze_steps), max(int(steps) // 10, 1))
    return config


def pretrain(objective: str, workdir: str, steps: int | None, preset: str, knn_every: int,
             overrides: dict | None = None) -> float:
    """Trains (or resumes/finishes) the preset; returns the wall-clock seconds spent now."""
    from swin_ssl.train.loop import train_and_evaluate

    config = load_train_config(objective, steps, preset, knn_every, overrides)
    t0 = time.perf_counter()
    out = train_and_evaluate(config, workdir)
    for step, metrics in out["evals"]:
        print(f"  {objective} step {step}: in-training k-NN (10k bank) "
              + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "top1" in k), flush=True)
    return time.perf_counter() - t0


def evaluate_set(fs, args, rows, extra_seconds=0.0, note=""):
    from swin_ssl.evaluators import compare

    row = {"method": fs.name + note}
    m = compare.knn_metrics(fs, ks=(1, 20))
    row["k-NN k=1"], row["k-NN k=20"] = m["knn/top1_k1"], m["knn/top1_k20"]
    seconds = {"extract s": fs.seconds, "k-NN s": m["knn/seconds"]}
    for protocol in ("esvit", "moby"):
        if args.linear_epochs <= 0:
            continue
        lm = compare.linear_metrics(fs, protocol, epochs=args.linear_epochs, lrs=LINEAR_LRS[protocol])
        row[f"linear {protocol}"] = lm[f"linear_{protocol}/top1"]
        row[f"{protocol} lr"] = lm[f"linear_{protocol}/best_lr"]
        seconds[f"linear {protocol} s"] = lm[f"linear_{protocol}/train_seconds"]
    row["pretrain s"] = extra_seconds
    row.update(seconds)
    rows.append(row)
    print(compare.format_table([row]), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "fmnist_bench"))
    parser.add_argument("--objectives", default="moby,esvit", help="comma list of moby, esvit (empty: baselines only)")
    parser.add_argument("--preset", default="fmnist30",
                        help="config preset: fmnist30 (30-minute budget on 2 idle cores; falls back to demo where a "
                             "config has none) or demo (the ~10-minute `make demo` recipe)")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training-config field, e.g. --set optim.base_lr=0.004 (repeatable)")
    parser.add_argument("--knn_every", type=int, default=0,
                        help="in-training k-NN (10k bank, 10k test) every N steps: the learning curve")
    parser.add_argument("--skip_pretrain", action="store_true", help="evaluate existing checkpoints only")
    parser.add_argument("--linear_epochs", type=int, default=100, help="0 skips the linear probes")
    parser.add_argument("--train_examples", type=int, default=None, help="subset of the 60k training images")
    parser.add_argument("--test_examples", type=int, default=None, help="subset of the 10k test images")
    parser.add_argument("--batch_size", type=int, default=512, help="feature-extraction batch")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value  # a bare string

    from swin_ssl import host_memory

    host_memory.keep_freed_memory_mapped()  # as train.py does, before JAX starts its backend
    import jax
    from swin_ssl.evaluators import compare

    os.makedirs(args.workdir, exist_ok=True)
    objectives = [o for o in args.objectives.split(",") if o]
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; workdir {args.workdir}", flush=True)
    rows, t_start = [], time.perf_counter()

    evaluate_set(compare.raw_pixel_set(args.train_examples, args.test_examples), args, rows)

    pretrained, random_done = {}, False
    for objective in objectives:
        run_dir = os.path.join(args.workdir, objective)
        seconds = 0.0
        if not args.skip_pretrain:
            print(f"pretraining {objective} -> {run_dir}", flush=True)
            seconds = pretrain(objective, run_dir, args.steps, args.preset, args.knn_every, overrides)
            print(f"pretraining {objective}: {seconds:.0f} s", flush=True)
        model, params, meta = compare.load_checkpoint_backbone(run_dir, "default")
        data_cfg = compare.fmnist_config(meta["image_size"], args.train_examples, args.test_examples)
        if not random_done:
            rand = compare.random_init_like(model, meta["image_size"])
            evaluate_set(compare.backbone_set("random init", model, rand, data_cfg, batch_size=args.batch_size),
                         args, rows)
            random_done = True
        name = f"{objective} ({meta['network']}, {meta.get('step')} steps)"
        pretrained[objective] = evaluate_set(compare.backbone_set(name, model, params, data_cfg,
                                                                  batch_size=args.batch_size), args, rows, seconds)

    total = time.perf_counter() - t_start
    n_train = args.train_examples or 60000
    n_test = args.test_examples or 10000
    title = (f"Fashion-MNIST, swin_nano, {n_train} train / {n_test} test; k-NN T=0.07; linear {args.linear_epochs} "
             f"epochs on cached features (best over lrs and epochs); total {total:.0f} s")
    print("\n" + compare.format_table(rows, title=title))
    with open(os.path.join(args.workdir, "fmnist_results.json"), "w") as f:
        json.dump({"rows": rows, "title": title, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``python -m swin_ssl.convert`` command line: ``import``, ``export`` and ``inspect`` (usage in the package
docstring, ``swin_ssl/convert/__init__.py``)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from swin_ssl import convert, storage
from swin_ssl.convert.converted import load_converted, save_converted
from swin_ssl.convert.errors import ConversionError
from swin_ssl.convert.exporting import export_state, export_workdir
from swin_ssl.convert.importing import Report, import_checkpoint
from swin_ssl.convert.layouts import detect_layout, guess_architecture
from swin_ssl.convert.pth import read_pth, write_pth


def _count(tree) -> int:
    import jax
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


def _parse_bool(s: str):
    return {"auto": None, "true": True, "false": False}[s.lower()]


def _int_at_least(low: int):
    """argparse type: an integer >= `low` (argparse turns the ValueError into a usage error naming the option)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not an integer >= {low}")
        return value
    parse.__name__ = "integer"
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swin_ssl.convert", description=convert.__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="official .pth -> converted .msgpack")
    imp.add_argument("checkpoint")
    imp.add_argument("--model", required=True, help="create_model name, e.g. swin_tiny, deit_small")
    imp.add_argument("--out", required=True)
    imp.add_argument("--layout", default="auto", choices=["auto", "backbone", "moby", "esvit", "dino"])
    imp.add_argument("--num-classes", type=_int_at_least(0), default=None,
                     help="default: from head.weight (plain backbones), else 0; 0 drops a classifier")
    imp.add_argument("--window-size", type=_int_at_least(1), default=None,
                     help="Swin window (tables are resized bicubically)")
    imp.add_argument("--img-size", type=_int_at_least(1), default=None,
                     help="configured resolution (ViT position embeddings are resized)")
    imp.add_argument("--norm-eps", type=_positive_float, default=None,
                     help="LayerNorm eps (default: model's; 1e-6 for esvit)")
    imp.add_argument("--norm-last-layer", default="auto", choices=["auto", "true", "false"],
                     help="DINO heads: fixed g=1 (auto: true iff every weight_g is 1)")
    imp.add_argument("--non-strict", action="store_true", help="load what matches, report the rest")
    imp.add_argument("--no-resize", action="store_true", help="mis-shaped position tables are errors")
    exp = sub.add_parser("export", help="converted .msgpack or a training workdir -> official .pth")
    exp.add_argument("source", help="converted .msgpack, or a training workdir (its checkpoints/)")
    exp.add_argument("--out", required=True)
    exp.add_argument("--which", default=None, help="write only this backbone as {'model': ...}: backbone, online, "
                                                   "target, student, teacher (default: the whole source layout)")
    exp.add_argument("--attn-mask", action="store_true",
                     help="also write attn_mask buffers (official classification code)")
    exp.add_argument("--network", default="default", choices=["default", "online", "target"],
                     help="workdir: which backbone (default: the objective's evaluation choice)")
    exp.add_argument("--step", type=_int_at_least(0), default=None, help="workdir: checkpoint step (default: latest)")
    ins = sub.add_parser("inspect", help="summary of a .pth or a converted .msgpack")
    ins.add_argument("file")
    args = p.parse_args(argv)
    try:
        if args.command == "import":
            kwargs = {k: v for k, v in dict(num_classes=args.num_classes, window_size=args.window_size,
                                            img_size=args.img_size, norm_eps=args.norm_eps).items() if v is not None}
            conv = import_checkpoint(args.checkpoint, args.model, args.layout, model_kwargs=kwargs,
                                     strict=not args.non_strict, resize=not args.no_resize,
                                     norm_last_layer=_parse_bool(args.norm_last_layer))
            save_converted(conv, args.out)
            report = Report(**conv["meta"]["report"])
            print(f"{args.checkpoint} -> {args.out}: layout {conv['meta']['layout']}, model {args.model} "
                  f"{conv['meta']['model_kwargs']}, {_count(conv['variables']):,} values; {report.summary()}")
            if report.problems or report.resized:
                print(report.details())
        elif args.command == "export" and storage.as_path(args.source).is_dir():
            meta = export_workdir(args.source, args.out, args.network, args.step, args.attn_mask)
            print(f"{args.source} (step {meta.get('step')}, {meta.get('objective')}, {meta['model']}, "
                  f"{args.network} backbone) -> {args.out}")
        elif args.command == "export":
            obj = export_state(load_converted(args.source), args.which, args.attn_mask)
            write_pth(obj, args.out)
            print(f"{args.source} -> {args.out}: keys {', '.join(f'{k} ({len(v)} tensors)' for k, v in obj.items())}")
        else:
            if args.file.endswith(".msgpack"):
                conv = load_converted(args.file)
                print(json.dumps({k: v for k, v in conv["meta"].items() if k != "report"}, indent=1))
                print(f"{_count(conv['variables']):,} values; groups {sorted(conv['variables'])}")
            else:
                layout, flat = detect_layout(read_pth(args.file))
                print(f"layout {layout}: {len(flat)} tensors, {sum(v.size for v in flat.values()):,} values")
                print(f"architecture: {guess_architecture(flat) or 'unknown'}")
    except (ConversionError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line; a strict import's report follows, indented
        return 1
    return 0

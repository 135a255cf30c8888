"""Attention maps and EsViT-style region correspondences, written as PNG figures (matplotlib, Agg).

    python -m swin_ssl.visualize attention --checkpoint esvit.msgpack --image photo.jpg --out attention.png
    python -m swin_ssl.visualize correspondence --checkpoint esvit.msgpack --image photo.jpg --out corr.png
    python -m swin_ssl.visualize attention --model deit_small --image photo.jpg --out attention.png  # random init

``--checkpoint`` is a file from ``python -m swin_ssl.convert import`` (its backbone: the EsViT/DINO teacher,
the MoBY online encoder, or ``--which``); without it ``--model`` is initialised at random (``--seed``).

* **attention**, ViT: the CLS token's attention to the patches in the last block, per head and averaged
  (DINO's figure; the model sows it under the ``intermediates`` collection).
  Swin: for each query point, the cosine similarity of its last-stage token (``features["tokens"]``, after the
  final norm) to all tokens, and, when the last stage is one unshifted window (224 px, W7 -> 7x7), the last
  block's attention of that token per head, recomputed from the block's captured qkv and relative-position bias.
* **correspondence**: two random views of the image (crop scale 0.4-1, flips, as EsViT's global crops), each
  view-1 token matched to its most similar view-2 token (cosine of last-stage tokens, as EsViT's region
  matching); the ``top-k`` most similar pairs are drawn as lines, green where the match lands within one token
  of the true location of that point in view 2 (known from the crop geometry), red elsewhere.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Sequence

import numpy as np

from swin_ssl import normalization, storage
from swin_ssl.convert.modules import input_size  # light: imports the models only when called

MEAN = np.array(normalization.IMAGENET_MEAN, np.float32)  # as the data pipeline normalises
STD = np.array(normalization.IMAGENET_STD, np.float32)


# ----------------------------------------------------------------------------------------------
# Inputs

def load_image(path: str):
    from PIL import Image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except Exception as e:
        raise ValueError(f"{path} is not a readable image: {e}") from e


def center_view(image, size: tuple[int, int]) -> np.ndarray:
    """Shorter side resized to cover ``size`` (bicubic), centre crop -> uint8 [H, W, 3]."""
    from PIL import Image
    h, w = size
    scale = max(h / image.height, w / image.width)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC)
    top, left = (resized.height - h) // 2, (resized.width - w) // 2
    return np.asarray(resized.crop((left, top, left + w, top + h)))


def normalize(views: np.ndarray) -> np.ndarray:
    return ((views.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def load_model(checkpoint: str | None = None, which: str | None = None, model: str | None = None, seed: int = 0):
    """(module, variables, label): a converted checkpoint's backbone, or ``model`` at random init."""
    import jax
    import jax.numpy as jnp
    from swin_ssl import convert
    if checkpoint:
        module, variables = convert.load_backbone(checkpoint, which)
        return module, variables, f"{os.path.basename(checkpoint)}"
    if not model:
        raise ValueError("give --checkpoint (a converted .msgpack) or --model NAME (random init)")
    from swin_ssl.models import create_model
    module = create_model(model)
    size = input_size(module)
    variables = jax.jit(module.init)({"params": jax.random.PRNGKey(seed)}, jnp.zeros((1, *size, 3), jnp.float32))
    return module, {"params": variables["params"]}, f"{model}, random init (seed {seed})"


def is_vit(module) -> bool:
    return not hasattr(module, "depths")


# ----------------------------------------------------------------------------------------------
# Maps

def vit_cls_attention(module, variables, images: np.ndarray) -> np.ndarray:
    """[B, heads, gh, gw]: the last block's attention from CLS to the patch tokens."""
    import jax
    import jax.numpy as jnp

    def run(v, x):
        _, state = module.apply(v, x, mutable=["intermediates"])
        return state["intermediates"][f"blocks_{module.depth - 1}"]["attn"]["attention"][0]

    attn = np.asarray(jax.jit(run)(variables, jnp.asarray(normalize(images))))  # [B, nH, 1+N, 1+N]
    b, heads = attn.shape[:2]
    gh, gw = images.shape[1] // module.patch_size, images.shape[2] // module.patch_size
    return attn[:, :, 0, 1:].reshape(b, heads, gh, gw)


def swin_last_attention(module, variables, images: np.ndarray) -> dict:
    """Last-stage ``tokens`` [B, h, w, D] and, when the last stage is one unshifted window (a plain global
    attention over its tokens), the last block's ``attention`` [B, heads, N, N], recomputed as
    softmax(q k^T * head_dim^-0.5 + relative-position bias) from its captured q, k, v projections (as one [B, N, 3C]);
    ``attn_out`` is the block's captured attention-module output (for checking the recomputation).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from swin_ssl.models.swin import relative_position_index, stage_geometry

    last, block = len(module.depths) - 1, module.depths[-1] - 1
    window, shift = stage_geometry(input_size(module), module.patch_size, module.window_size, len(module.depths))[-1]
    attn_path = (f"layers_{last}", f"blocks_{block}", "attn")

    def wanted(mdl, name):
        path = tuple(mdl.scope.path) if mdl.scope is not None else ()
        return name == "__call__" and path in (attn_path, attn_path + ("qkv",))

    def run(v, x):
        (_, feats), state = module.apply(v, x, capture_intermediates=wanted, mutable=["intermediates"])
        node = state["intermediates"]
        for part in attn_path:
            node = node[part]
        return feats["tokens"], jnp.concatenate(node["qkv"]["__call__"][0], axis=-1), node["__call__"][0]

    tokens, qkv, attn_out = (np.asarray(a) for a in jax.jit(run)(variables, jnp.asarray(normalize(images))))
    b, h, w, _ = tokens.shape
    result = dict(tokens=tokens, attention=None, qkv=qkv, attn_out=attn_out)
    if (h, w) != (window, window) or shift or qkv.shape[0] != b:
        return result
    heads = module.num_heads[-1]
    n, c3 = qkv.shape[1:]
    hd = c3 // 3 // heads
    q, k = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)[:2].astype(np.float64)
    table = np.asarray(variables["params"][attn_path[0]][attn_path[1]]["attn"]["relative_position_bias_table"])
    bias = table[relative_position_index(window).reshape(-1)].reshape(n, n, heads).transpose(2, 0, 1)
    logits = (q * hd ** -0.5) @ k.transpose(0, 1, 3, 2) + bias[None]
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    result["attention"] = attn / attn.sum(-1, keepdims=True)
    return result


def cosine_maps(tokens: np.ndarray, queries: Sequence[tuple[int, int]]) -> np.ndarray:
    """[Q, h, w] cosine similarity of each query token (row, col) to every token of ``tokens`` [h, w, D]."""
    t = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    return np.stack([t @ t[r, c] for r, c in queries])


# ----------------------------------------------------------------------------------------------
# Figures

def _figure(rows: int, cols: int, scale: float = 2.4):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(cols * scale, rows * scale + 0.5), dpi=100)
    axes = np.array(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _show_map(ax, image: np.ndarray, grid: np.ndarray, title: str, overlay: bool) -> None:
    h, w = image.shape[:2]
    if overlay:
        ax.imshow(image)
    ax.imshow(grid, cmap="inferno", interpolation="nearest", extent=(0, w, h, 0), alpha=0.65 if overlay else 1.0)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=8)


def attention_figure(module, variables, image, label: str, queries: Sequence[tuple[float, float]] | None = None,
                     size: tuple[int, int] | None = None, max_heads: int = 6):
    size = size or input_size(module)
    view = center_view(image, size)
    if is_vit(module):
        maps = vit_cls_attention(module, variables, view[None])[0]
        heads = min(len(maps), max_heads)
        fig, axes = _figure(1, heads + 2)
        axes[0, 0].imshow(view)
        axes[0, 0].set_title("image", fontsize=8)
        _show_map(axes[0, 1], view, maps.mean(0), "CLS attention, mean of heads", overlay=True)
        for i in range(heads):
            _show_map(axes[0, i + 2], view, maps[i], f"head {i}", overlay=False)
        fig.suptitle(f"last-block CLS attention ({module.num_heads} heads) - {label}", fontsize=9)
        return fig
    queries = list(queries or [(0.5, 0.5), (0.3, 0.7)])
    res = swin_last_attention(module, variables, view[None])
    tokens, attn = res["tokens"], res["attention"]
    h, w = tokens.shape[1:3]
    cells = [(min(int(y * h), h - 1), min(int(x * w), w - 1)) for y, x in queries]
    sims = cosine_maps(tokens[0], cells)
    heads = 0 if attn is None else min(attn.shape[1], max_heads - 2)
    fig, axes = _figure(len(cells), 2 + (heads + 1 if attn is not None else 0))
    sy, sx = view.shape[0] / h, view.shape[1] / w
    for row, (r, c) in enumerate(cells):
        axes[row, 0].imshow(view)
        axes[row, 0].scatter([(c + 0.5) * sx], [(r + 0.5) * sy], s=60, c="cyan", marker="x", linewidths=2)
        axes[row, 0].set_title(f"query token ({r}, {c})", fontsize=8)
        _show_map(axes[row, 1], view, sims[row], "cosine similarity", overlay=True)
        if attn is not None:
            a = attn[0, :, r * w + c].reshape(-1, h, w)
            _show_map(axes[row, 2], view, a.mean(0), "attention, mean of heads", overlay=True)
            for i in range(heads):
                _show_map(axes[row, 3 + i], view, a[i], f"head {i}", overlay=False)
    note = "" if attn is not None else " (last stage is not one window: attention not shown)"
    fig.suptitle(f"last-stage tokens {h}x{w}{note} - {label}", fontsize=9)
    return fig


def random_view(image, size: tuple[int, int], rng: np.random.Generator, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
    """(uint8 view, (left, top, width, height) box in the image, flipped) - a RandomResizedCrop + flip."""
    from PIL import Image
    area = image.width * image.height
    for _ in range(20):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= image.width and 0 < ch <= image.height:
            break
    else:
        cw = ch = min(image.width, image.height)
    left, top = int(rng.integers(0, image.width - cw + 1)), int(rng.integers(0, image.height - ch + 1))
    view = image.crop((left, top, left + cw, top + ch)).resize((size[1], size[0]), Image.BICUBIC)
    flip = bool(rng.random() < 0.5)
    if flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view), (left, top, cw, ch), flip


def _to_image(xy, box, flip, size):
    x, y = xy
    x = size[1] - x if flip else x
    return box[0] + x / size[1] * box[2], box[1] + y / size[0] * box[3]


def _to_view(xy, box, flip, size):
    x, y = (xy[0] - box[0]) / box[2] * size[1], (xy[1] - box[1]) / box[3] * size[0]
    return (size[1] - x if flip else x), y


def correspondences(module, variables, image, size: tuple[int, int] | None = None, top_k: int = 10, seed: int = 0):
    """Two views and their ``top_k`` best token matches:
    ``dict(views, boxes, flips, grid, matches=[(i1, i2, similarity, consistent)])``."""
    import jax
    import jax.numpy as jnp
    size = size or input_size(module)
    rng = np.random.default_rng(seed)
    (v1, b1, f1), (v2, b2, f2) = random_view(image, size, rng), random_view(image, size, rng)
    _, feats = jax.jit(module.apply)(variables, jnp.asarray(normalize(np.stack([v1, v2]))))
    tokens = np.asarray(feats["tokens"])
    _, h, w, d = tokens.shape
    t = tokens.reshape(2, h * w, d)
    t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    sim = t[0] @ t[1].T
    best, score = sim.argmax(1), sim.max(1)
    sy, sx = size[0] / h, size[1] / w
    matches = []
    for i in np.argsort(-score)[:top_k]:
        j = int(best[i])
        centre = ((i % w + 0.5) * sx, (i // w + 0.5) * sy)
        x2, y2 = _to_view(_to_image(centre, b1, f1, size), b2, f2, size)
        inside = 0 <= x2 < size[1] and 0 <= y2 < size[0]
        ok = inside and abs(int(y2 // sy) - j // w) <= 1 and abs(int(x2 // sx) - j % w) <= 1
        matches.append((int(i), j, float(score[i]), bool(ok)))
    return dict(views=(v1, v2), boxes=(b1, b2), flips=(f1, f2), grid=(h, w), matches=matches)


def correspondence_figure(module, variables, image, label: str, size=None, top_k: int = 10, seed: int = 0):
    from matplotlib.lines import Line2D
    res = correspondences(module, variables, image, size, top_k, seed)
    v1, v2 = res["views"]
    h, w = res["grid"]
    gap = v1.shape[1] // 10
    canvas = np.full((v1.shape[0], v1.shape[1] * 2 + gap, 3), 255, np.uint8)
    canvas[:, :v1.shape[1]], canvas[:, v1.shape[1] + gap:] = v1, v2
    fig, axes = _figure(1, 1, scale=5.0)
    ax = axes[0, 0]
    ax.imshow(canvas)
    sy, sx, off = v1.shape[0] / h, v1.shape[1] / w, v1.shape[1] + gap
    for i, j, s, ok in res["matches"]:
        p1 = ((i % w + 0.5) * sx, (i // w + 0.5) * sy)
        p2 = ((j % w + 0.5) * sx + off, (j // w + 0.5) * sy)
        colour = "lime" if ok else "red"
        ax.plot([p1[0], p2[0]], [p1[1], p2[1]], "-", color=colour, lw=1.5, alpha=0.9)
        ax.plot(*zip(p1, p2), "o", color=colour, ms=4)
    good = sum(m[3] for m in res["matches"])
    ax.legend(handles=[Line2D([], [], color="lime", label="consistent with the crop geometry"),
                       Line2D([], [], color="red", label="inconsistent")], loc="lower center", fontsize=7,
              bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.set_title(f"top-{len(res['matches'])} token matches between two views ({good} consistent; tokens {h}x{w}) "
                 f"- {label}", fontsize=8)
    return fig, res


def save_figure(fig, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=os.path.splitext(path)[1][1:] or "png", bbox_inches="tight")
    storage.atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# CLI

def _query(text: str) -> tuple[float, float]:
    y, x = (float(v) for v in text.split(","))
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise argparse.ArgumentTypeError("a query is 'Y,X' as fractions of the image height and width")
    return y, x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swin_ssl.visualize", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("attention", "last-layer attention / token similarity maps"),
                       ("correspondence", "top-k token correspondences between two augmented views")):
        s = sub.add_parser(name, help=text)
        src = s.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", help="converted .msgpack (python -m swin_ssl.convert import ...)")
        src.add_argument("--model", help="model name, randomly initialised (for tests and figure layout)")
        s.add_argument("--which", default=None, help="backbone of the checkpoint: teacher, student, online, target")
        s.add_argument("--image", required=True)
        s.add_argument("--out", required=True, help="PNG path")
        s.add_argument("--image-size", type=int, default=None, help="default: the model's configured size")
        s.add_argument("--seed", type=int, default=0, help="random init and augmentation seed")
        if name == "attention":
            s.add_argument("--query", type=_query, action="append",
                           help="Swin query point 'Y,X' (fractions of height, width); repeatable")
        else:
            s.add_argument("--top-k", type=int, default=10)
    args = p.parse_args(argv)
    try:
        image = load_image(args.image)  # inputs first: fail before building a model
        if args.checkpoint and not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
        module, variables, label = load_model(args.checkpoint, args.which, args.model, args.seed)
        size = (args.image_size, args.image_size) if args.image_size else None
        if args.command == "attention":
            fig = attention_figure(module, variables, image, label, args.query, size)
        else:
            fig, res = correspondence_figure(module, variables, image, label, size, args.top_k, args.seed)
            print(f"{sum(m[3] for m in res['matches'])}/{len(res['matches'])} matches consistent with the crops")
        save_figure(fig, args.out)
        print(f"wrote {args.out}")
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

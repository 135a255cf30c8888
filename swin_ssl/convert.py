"""PyTorch checkpoints in and out: official Swin / DeiT / MoBY / EsViT / DINO ``.pth`` <-> Flax variables.

Why: runs continue from (and evaluators read) the released checkpoints, and a Flax-pretrained Swin goes
to the PyTorch detection / segmentation code. Usage::

    python -m swin_ssl.convert import moby_swin_t_300ep_pretrained.pth --model swin_tiny --out moby.msgpack
    python -m swin_ssl.convert import esvit_swin_t_w7.pth --model swin_tiny --out esvit.msgpack   # eps 1e-6 set
    python -m swin_ssl.convert import swin_tiny_patch4_window7_224.pth --model swin_tiny --window-size 14 \
        --out w14.msgpack                                                              # tables resized 7 -> 14
    python -m swin_ssl.convert export moby.msgpack --out moby_again.pth                # the full MoBY layout back
    python -m swin_ssl.convert export esvit.msgpack --which teacher --out swin_t_esvit.pth   # {'model': backbone}
    python -m swin_ssl.convert export runs/esvit --network target --out teacher.pth    # a training workdir
    python -m swin_ssl.convert inspect some.pth                                        # layout + architecture guess

``.pth`` files are read with ``torch.load(weights_only=True)`` (torch: ``pip install torch==2.13.0``). Official
MoBY files also pickle a yacs config, which that refuses; they are then read by a restricted unpickler that
rebuilds tensors and plain containers only and keeps every other pickled object as inert data (nothing imported
or called). Files that name blocked modules (``os``, ...) are refused.

**Converted file** (``.msgpack``, written with ``flax.serialization.msgpack_serialize``; read it with
:func:`load_converted`): a nested dict of NumPy arrays, the *variables*, plus ``"meta"`` (a JSON string).
The variables mirror the source layout; every module entry is a Flax variables dict ready for ``module.apply``,
and ``obj_state`` is in the train state's layout (``swin_ssl.objectives``; :func:`train_state_parts`):

=========  ======================================================================================
layout     variables
=========  ======================================================================================
backbone   ``{"backbone": {"params"}}`` -- official Swin ``{'model': ...}``, DeiT/ViT (timm layout), bare dicts
moby       ``{"online": {"backbone", "projector", "predictor"}, "target": {"backbone", "projector"},
           "obj_state": {"queue1", "queue2" [K, dim], "ptr" int32}}`` (official: [dim, K], ``queue_ptr`` [1])
esvit      ``{"student": {"backbone", "head"[, "head_dense"]}, "teacher": {...},
           "obj_state": {"center"[, "center_grid"] [K]}}`` (official ``dino_loss``: [1, K])
dino       as esvit; the torch keys carry ``backbone.`` (DINO's MultiCropWrapper)
=========  ======================================================================================

The evaluators' ``params_file`` loader (``swin_ssl/evaluators/loading.py``) reads these files directly: its
``online``/``target`` selection finds ``online``/``student`` and ``target``/``teacher``.

``meta``: ``format``, ``layout``, ``model`` + ``model_kwargs`` (``create_model(model, **model_kwargs)``
rebuilds the backbone), ``heads`` (name -> ``{"type", "kwargs"}``, inferred from the tensor shapes),
``source`` and the load ``report``. :func:`load_backbone` gives evaluators ``(model, variables)`` of the
conventional backbone: the MoBY online encoder (MoBY's linear protocol), the EsViT/DINO teacher.

Layout rules: Linear ``(out, in)`` -> ``kernel (in, out)``; Conv ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``;
the fused qkv keeps its ``(3, heads, head_dim)`` row order as kernel columns (the Flax attention reshapes
the same way); LayerNorm/BatchNorm ``weight``/``bias`` -> ``scale``/``bias``, BN ``running_mean|var`` ->
``batch_stats`` ``mean|var``; DINO ``weight_v (out, in)`` -> ``kernel_v (in, out)``, ``weight_g (out, 1)`` ->
``scale_g (out,)`` (absent when ``norm_last_layer``: g must then be all ones). Buffers
(``relative_position_index``, ``attn_mask``, ``num_batches_tracked``) are dropped on import and regenerated
on export. Relative-position tables (window change, e.g. 7 -> 14) and ViT position embeddings (resolution
change) are resized bicubically with PyTorch's kernel (``F.interpolate(mode="bicubic", size=...)``,
a=-0.75, align_corners=False). Loading is strict by default: every missing, unexpected or mis-shaped tensor
is listed in one error naming the file and the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import types
import zipfile
from typing import Any, Mapping

import numpy as np

FORMAT = "swin_ssl.convert/1"
IGNORED_BUFFERS = ("relative_position_index", "attn_mask", "num_batches_tracked", "relative_coords_table")
DEFAULT_BACKBONE = {"backbone": "backbone", "moby": "online", "esvit": "teacher", "dino": "teacher"}
TORCH_HINT = "pip install torch==2.13.0 (or the project's extra: pip install -e '.[torch]')"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: wrong architecture, unreadable file, unknown layout."""


# ----------------------------------------------------------------------------------------------
# Reading and writing .pth files

def require_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading or writing PyTorch .pth files needs torch, which is not installed: "
                          f"{TORCH_HINT}") from e
    return torch


class _Opaque(dict):
    """Inert stand-in for a pickled non-tensor object (a yacs config, argparse args): never imported, never run."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self["__state__"] = state

    def __call__(self, *args, **kwargs):  # a stand-in for a pickled callable (e.g. getattr(...)(...)) stays inert
        return _Opaque()

    def append(self, item):
        self.setdefault("__items__", []).append(item)

    def extend(self, items):
        self.setdefault("__items__", []).extend(items)


def _restricted_pickle_module():
    """A pickle module whose Unpickler builds tensors and plain containers only; any other global becomes _Opaque.

    Official MoBY checkpoints pickle a yacs ``CfgNode`` under ``config``, which ``weights_only=True`` refuses
    (torch allows SETITEMS only on real dicts). This fallback keeps the same safety: it imports nothing else.
    """
    import pickle

    import torch  # noqa: F401  (the rebuild helpers below live in torch)

    allowed = {("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_tensor",
                                              "_rebuild_parameter", "_rebuild_parameter_with_state")}
    allowed |= {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset")}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return super().find_class(module, name)
            return type(f"Opaque[{module}.{name}]", (_Opaque,), {})

    mod = types.ModuleType("swin_ssl_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.__name__ = "swin_ssl_restricted_pickle"
    return mod


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ConversionError(f"{path}: the zip archive torch.save writes is unreadable ({e}); "
                                  f"the file is truncated or corrupted (size {os.path.getsize(path)} bytes)") from e
    elif not head[:1] == b"\x80":  # legacy torch files start with a pickle protocol opcode
        raise ConversionError(f"{path} is not a PyTorch checkpoint: it starts with {head!r}, expected a zip archive "
                              "(torch.save) or a legacy pickle")


def _to_numpy(obj: Any) -> Any:
    import torch
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(obj, Mapping) and not isinstance(obj, _Opaque):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_numpy(v) for v in obj]
    return obj


def read_pth(path: str) -> dict:
    """``torch.load(weights_only=True)``, tensors -> NumPy; falls back to an equally restricted loader for metadata."""
    _check_file(path)
    torch = require_torch()
    import pickle
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "SETITEM" not in str(e):
            raise ConversionError(f"{path} could not be read as a PyTorch checkpoint: {str(e)[-300:]}") from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
        except Exception as e2:
            raise ConversionError(f"{path} could not be read as a PyTorch checkpoint: {e2}") from e2
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupted?): {e}") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of tensors or a checkpoint dict")
    return _to_numpy(obj)


def write_pth(obj: Mapping, path: str) -> None:
    """``torch.save`` of a nested dict of NumPy arrays (arrays become tensors)."""
    torch = require_torch()

    def conv(o):
        if isinstance(o, np.ndarray):
            o = np.ascontiguousarray(o)
            return torch.from_numpy(o if o.flags.writeable else o.copy())
        if isinstance(o, Mapping):
            return {k: conv(v) for k, v in o.items()}
        return o
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(conv(obj), path)


# ----------------------------------------------------------------------------------------------
# Resizing (PyTorch's bicubic, so resized tables equal the official loaders' results)

def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of ``F.interpolate(size=n_out, mode="bicubic", align_corners=False)`` along one axis."""
    dst = np.arange(n_out)
    src = (dst + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(np.int64)
    t = src - base
    m = np.zeros((n_out, n_in))
    for offset in (-1, 0, 1, 2):
        np.add.at(m, (dst, np.clip(base + offset, 0, n_in - 1)), _cubic(t - offset))
    return m


def resize_grid(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of [h, w, C] (separable; float64 inside)."""
    mh, mw = bicubic_matrix(grid.shape[0], out_hw[0]), bicubic_matrix(grid.shape[1], out_hw[1])
    out = np.einsum("oh,hwc,pw->opc", mh, grid.astype(np.float64), mw)
    return out.astype(grid.dtype)


def resize_rel_pos_table(table: np.ndarray, rows: int) -> np.ndarray:
    """[(2W-1)^2, nH] -> [rows, nH], as the official ``load_pretrained`` does when the window changes."""
    s_in, s_out = math.isqrt(table.shape[0]), math.isqrt(rows)
    if s_in * s_in != table.shape[0] or s_out * s_out != rows:
        raise ValueError(f"relative-position table rows {table.shape[0]} -> {rows} are not squares")
    return resize_grid(table.reshape(s_in, s_in, -1), (s_out, s_out)).reshape(rows, -1)


def resize_pos_embed(pos: np.ndarray, tokens: int) -> np.ndarray:
    """ViT [1, 1 + n*n, D] -> [1, tokens, D]: the patch grid is resized, the CLS embedding kept."""
    n_in, n_out = math.isqrt(pos.shape[1] - 1), math.isqrt(tokens - 1)
    if n_in * n_in != pos.shape[1] - 1 or n_out * n_out != tokens - 1:
        raise ValueError(f"position embedding {pos.shape[1]} -> {tokens} tokens is not a square grid plus CLS")
    grid = resize_grid(pos[0, 1:].reshape(n_in, n_in, -1), (n_out, n_out)).reshape(1, n_out * n_out, -1)
    return np.concatenate([pos[:, :1], grid], axis=1)


def _try_resize(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        if name.endswith("relative_position_bias_table") and arr.ndim == 2 and arr.shape[1] == shape[1]:
            return resize_rel_pos_table(arr, shape[0])
        if name.endswith("pos_embed") and arr.ndim == 3 and arr.shape[::2] == shape[::2]:
            return resize_pos_embed(arr, shape[1])
    except ValueError:
        return None
    return None


# ----------------------------------------------------------------------------------------------
# Names: Flax variable path <-> torch key

def _module_name(kind: str, head_kwargs: Mapping, name: str) -> str:
    m = re.fullmatch(r"(.+)_(\d+)", name)
    if not m:
        return name
    base, i = m.group(1), int(m.group(2))
    if kind == "moby_mlp":  # linear_hidden = [Identity, (Linear, BatchNorm1d, ReLU) x (num_layers - 1)]
        return {"hidden": f"linear_hidden.{3 * i + 1}", "bn": f"linear_hidden.{3 * i + 2}"}.get(base, name)
    if kind == "dino_head" and base == "mlp":  # mlp = Sequential(Linear, GELU, Linear, GELU, Linear), or one Linear
        return "mlp" if head_kwargs.get("num_layers", 3) == 1 else f"mlp.{2 * i}"
    return f"{base}.{i}"


def _leaf_rule(collection: str, leaf: str, ndim: int):
    """(torch name, flax->torch, torch->flax) for one leaf."""
    ident = (lambda x: x)
    if collection == "batch_stats":
        return {"mean": "running_mean", "var": "running_var"}[leaf], ident, ident
    if leaf == "kernel" and ndim == 4:
        return "weight", (lambda x: x.transpose(3, 2, 0, 1)), (lambda x: x.transpose(2, 3, 1, 0))
    if leaf in ("kernel", "kernel_v"):
        return leaf.replace("kernel", "weight"), (lambda x: x.T), (lambda x: x.T)
    if leaf == "scale_g":
        return "weight_g", (lambda x: x.reshape(-1, 1)), (lambda x: x.reshape(-1))
    if leaf == "scale":
        return "weight", ident, ident
    return leaf, ident, ident


def _torch_key(kind: str, head_kwargs: Mapping, path: tuple[str, ...], ndim: int):
    collection, *mods, leaf = path
    name, to_torch, from_torch = _leaf_rule(collection, leaf, ndim)
    return ".".join([_module_name(kind, head_kwargs, m) for m in mods] + [name]), to_torch, from_torch


# ----------------------------------------------------------------------------------------------
# Modules, slots and layouts

@dataclasses.dataclass
class Slot:
    """One module of a checkpoint: where it sits in the variables tree and under which torch key prefix."""
    group: tuple[str, ...]
    prefix: str
    kind: str  # "backbone" | "moby_mlp" | "dino_head"
    head: str | None = None  # key of meta["heads"]


def build_backbone(model: str, model_kwargs: Mapping | None = None):
    from swin_ssl.models import create_model
    return create_model(model, **dict(model_kwargs or {}))


def build_head(spec: Mapping):
    from swin_ssl.models import DINOHead, MoBYMLP
    return {"MoBYMLP": MoBYMLP, "DINOHead": DINOHead}[spec["type"]](**spec["kwargs"])


def _input_size(module) -> tuple[int, int]:
    size = module.img_size
    return (size, size) if isinstance(size, int) else tuple(size)


def init_variables(module, in_dim: int | None = None, seed: int = 0, abstract: bool = True):
    """Variables of a backbone (from its configured image size) or a head (from ``in_dim``); shapes only if abstract."""
    import jax
    import jax.numpy as jnp
    if in_dim is None:
        x = jnp.zeros((1, *_input_size(module), module.in_chans), jnp.float32)
        fn = lambda: module.init({"params": jax.random.PRNGKey(seed)}, x)  # noqa: E731
    else:
        x = jnp.zeros((2, in_dim), jnp.float32)
        fn = lambda: module.init({"params": jax.random.PRNGKey(seed)}, x, train=False)  # noqa: E731
    out = jax.eval_shape(fn) if abstract else jax.tree_util.tree_map(np.asarray, jax.jit(fn)())
    return {k: v for k, v in dict(out).items() if k in ("params", "batch_stats")}


def _strip(state: Mapping, prefix: str) -> dict:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _tensors(obj: Mapping) -> dict:
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def detect_layout(ckpt: Mapping) -> tuple[str, dict]:
    """(layout, flat {torch key: array}) with student/teacher keys as ``student.``/``teacher.`` + key."""
    if "student" in ckpt or "teacher" in ckpt:
        flat, prefixes = {}, set()
        for group in ("student", "teacher"):
            if isinstance(ckpt.get(group), Mapping):
                part = _strip(_tensors(ckpt[group]), "module.")
                prefixes.add(any(k.startswith("backbone.") for k in part))
                flat.update({f"{group}.{k}": v for k, v in part.items()})
        loss = ckpt.get("dino_loss")
        if isinstance(loss, Mapping):
            flat.update({f"state.{k}": v for k, v in _tensors(loss).items()})
        return ("dino" if True in prefixes else "esvit"), flat
    for key in ("model", "state_dict", "module"):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    flat = _strip(_tensors(ckpt), "module.")
    if any(k.startswith("encoder.") for k in flat):
        return "moby", flat
    return "backbone", _from_timm_swin(flat)


def _from_timm_swin(flat: dict) -> dict:
    """timm's Swin layout (PatchMerging at the *start* of stages 1-3, ``head.fc``) -> the official one."""
    if "layers.0.downsample.reduction.weight" in flat or "layers.1.downsample.reduction.weight" not in flat:
        return flat
    out = {}
    for k, v in flat.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[re.sub(r"^head\.fc\.", "head.", k)] = v
    return out


def _moby_kwargs(state: Mapping, prefix: str) -> dict:
    out = state.get(prefix + "linear_out.weight")
    if out is None or out.ndim != 2:
        raise ConversionError(f"no MoBY head under '{prefix}' (expected '{prefix}linear_out.weight')")
    linear = [int(m.group(1)) for k, v in state.items()
              if (m := re.fullmatch(re.escape(prefix) + r"linear_hidden\.(\d+)\.weight", k)) and v.ndim == 2]
    hidden = state[prefix + "linear_hidden.1.weight"].shape[0] if 1 in linear else out.shape[1]
    return dict(hidden_dim=int(hidden), out_dim=int(out.shape[0]), num_layers=len(linear) + 1)


def _dino_kwargs(state: Mapping, prefix: str, norm_last_layer: bool | None) -> dict:
    v = state.get(prefix + "last_layer.weight_v")
    if v is None:
        raise ConversionError(f"no DINO head under '{prefix}' (expected '{prefix}last_layer.weight_v')")
    if any(re.fullmatch(re.escape(prefix) + r"mlp\.\d+\.running_mean", k) for k in state):
        raise ConversionError(f"'{prefix}' is a DINO head with BatchNorm (use_bn_in_head=True), "
                              "which DINOHead does not support")
    if prefix + "mlp.weight" in state:
        kw = dict(num_layers=1, bottleneck_dim=int(state[prefix + "mlp.weight"].shape[0]))
    else:
        idx = sorted(int(m.group(1)) for k, a in state.items()
                     if (m := re.fullmatch(re.escape(prefix) + r"mlp\.(\d+)\.weight", k)) and a.ndim == 2)
        if not idx:
            raise ConversionError(f"no DINO head MLP under '{prefix}mlp.'")
        kw = dict(num_layers=len(idx), hidden_dim=int(state[f"{prefix}mlp.{idx[0]}.weight"].shape[0]),
                  bottleneck_dim=int(state[f"{prefix}mlp.{idx[-1]}.weight"].shape[0]))
    g = state.get(prefix + "last_layer.weight_g")
    if norm_last_layer is None:
        norm_last_layer = g is None or bool(np.all(g == 1))
    return dict(kw, out_dim=int(v.shape[0]), norm_last_layer=bool(norm_last_layer))


MOBY_SLOTS = [Slot(("online", "backbone"), "encoder.", "backbone"),
              Slot(("target", "backbone"), "encoder_k.", "backbone"),
              Slot(("online", "projector"), "projector.", "moby_mlp", "projector"),
              Slot(("target", "projector"), "projector_k.", "moby_mlp", "projector"),
              Slot(("online", "predictor"), "predictor.", "moby_mlp", "predictor")]


def layout_slots(layout: str, flat: Mapping, norm_last_layer: bool | None = None):
    """Slots, head specs and state keys of a layout, heads inferred from the tensors."""
    if layout == "backbone":
        return [Slot(("backbone",), "", "backbone")], {}, {}
    if layout == "moby":
        heads = {"projector": {"type": "MoBYMLP", "kwargs": _moby_kwargs(flat, "projector.")},
                 "predictor": {"type": "MoBYMLP", "kwargs": _moby_kwargs(flat, "predictor.")}}
        return MOBY_SLOTS, heads, {"queue1": "queue1", "queue2": "queue2", "queue_ptr": "queue_ptr"}
    if layout in ("esvit", "dino"):
        groups = sorted({k.split(".", 1)[0] for k in flat} & {"student", "teacher"})
        if not groups:
            raise ConversionError("an EsViT/DINO checkpoint needs 'student' and/or 'teacher' state dicts")
        ref = "teacher" if "teacher" in groups else "student"  # head shapes are read from the teacher
        heads, slots = {}, []
        for name in ("head", "head_dense"):
            if any(k.startswith(f"{ref}.{name}.") for k in flat):
                heads[name] = {"type": "DINOHead", "kwargs": _dino_kwargs(flat, f"{ref}.{name}.", norm_last_layer)}
        bb = "backbone." if layout == "dino" else ""
        for group in groups:
            slots.append(Slot((group, "backbone"), f"{group}.{bb}", "backbone"))
            slots += [Slot((group, name), f"{group}.{name}.", "dino_head", name) for name in heads]
        state = {k[len("state."):]: k for k in flat if k.startswith("state.")}
        return slots, heads, state
    raise ConversionError(f"unknown layout {layout!r}; known: backbone, moby, esvit, dino")


# ----------------------------------------------------------------------------------------------
# Import

@dataclasses.dataclass
class Report:
    missing: list = dataclasses.field(default_factory=list)
    unexpected: list = dataclasses.field(default_factory=list)
    mismatched: list = dataclasses.field(default_factory=list)
    resized: list = dataclasses.field(default_factory=list)
    dropped: int = 0

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def summary(self) -> str:
        return (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped, "
                f"{len(self.resized)} resized, {self.dropped} buffers dropped")

    def details(self) -> str:
        lines = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("mis-shaped", self.mismatched), ("resized", self.resized)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _shape(a) -> str:
    return "[" + ",".join(str(d) for d in a) + "]"


def _load_slot(flat: Mapping, slot: Slot, abstract: Mapping, head_kwargs: Mapping, report: Report, consumed: set,
               resize: bool) -> dict:
    from flax import traverse_util
    out = {}
    for path, sds in traverse_util.flatten_dict(abstract).items():
        key, to_torch, from_torch = _torch_key(slot.kind, head_kwargs, path, len(sds.shape))
        full = slot.prefix + key
        want = to_torch(np.zeros(sds.shape, np.int8)).shape
        if full not in flat:
            report.missing.append(f"{full} {_shape(want)}")
            continue
        consumed.add(full)
        arr = np.asarray(flat[full])
        if arr.shape != want:
            fixed = _try_resize(full, arr, want) if resize else None
            if fixed is None:
                report.mismatched.append(f"{full}: checkpoint {_shape(arr.shape)}, model expects {_shape(want)}")
                continue
            report.resized.append(f"{full}: {_shape(arr.shape)} -> {_shape(want)} (bicubic)")
            arr = fixed
        out[path] = np.asarray(from_torch(arr), dtype=sds.dtype)
    if slot.kind == "dino_head" and head_kwargs.get("norm_last_layer"):
        g_key = slot.prefix + "last_layer.weight_g"
        if g_key in flat:
            consumed.add(g_key)
            if not np.all(flat[g_key] == 1):
                report.mismatched.append(f"{g_key}: not all ones, but the head is loaded with norm_last_layer=True")
    return out


def _import_obj_state(flat: Mapping, state_keys: Mapping, heads: Mapping, report: Report, consumed: set) -> dict:
    """MoBY queues / DINO centers in the train state's layout (swin_ssl.objectives): queues [K, dim], ``ptr``
    an int32 scalar (official: [dim, K] and a [1] int64 ``queue_ptr``), centers [K] (official [1, K])."""
    expect = {"queue1": ("projector", 0), "queue2": ("projector", 0), "center": ("head", 1),
              "center_grid": ("head_dense", 1)}
    out = {}
    for name, key in state_keys.items():
        if key not in flat:
            report.missing.append(key)
            continue
        consumed.add(key)
        arr = np.asarray(flat[key])
        if name == "queue_ptr":
            out["ptr"] = np.asarray(arr.reshape(-1)[0], np.int32)
            continue
        head, axis = expect.get(name, (None, 0))
        dim = heads[head]["kwargs"]["out_dim"] if head in heads else None
        if arr.ndim != 2 or (dim is not None and arr.shape[axis] != dim) or (axis == 1 and arr.shape[0] != 1):
            report.mismatched.append(f"{key}: {_shape(arr.shape)} does not fit the {head} ({dim} outputs)")
            continue
        out[name] = np.ascontiguousarray(arr.T) if axis == 0 else arr.reshape(-1)
    return out


def _export_obj_state(obj_state: Mapping) -> dict:
    out = {}
    for name, arr in obj_state.items():
        arr = np.asarray(arr)
        if name == "ptr":
            out["queue_ptr"] = arr.reshape(1).astype(np.int64)
        elif name.startswith("queue"):
            out[name] = np.ascontiguousarray(arr.T)
        else:
            out[name] = arr.reshape(1, -1)
    return out


def import_state(flat: Mapping[str, np.ndarray], model: str, layout: str = "backbone", *,
                 model_kwargs: Mapping | None = None, strict: bool = True, resize: bool = True,
                 norm_last_layer: bool | None = None, source: str = "<dict>", seed: int = 0) -> dict:
    """A flat ``{torch key: array}`` in one of the layouts (see :func:`detect_layout`) -> ``{"meta", "variables"}``.

    ``model_kwargs`` go to ``create_model`` (``window_size``, ``img_size``: tables / position embeddings are
    resized unless ``resize=False``); ``strict=False`` keeps the initialisation (``seed``) for missing or
    mis-shaped tensors and records them in ``meta["report"]``; ``norm_last_layer`` (DINO heads) None = auto.
    """
    from flax import traverse_util
    model_kwargs = dict(model_kwargs or {})
    if layout == "esvit":
        model_kwargs.setdefault("norm_eps", 1e-6)  # EsViT's Swin uses LayerNorm eps 1e-6 (ref. T6)
    classifier = layout == "backbone" and np.ndim(flat.get("head.weight")) == 2
    drop_classifier = classifier and model_kwargs.get("num_classes") == 0  # asked for explicitly: drop head.*
    if model_kwargs.get("num_classes") is None:
        model_kwargs.pop("num_classes", None)
        if classifier:
            model_kwargs["num_classes"] = int(flat["head.weight"].shape[0])
    backbone = build_backbone(model, model_kwargs)
    slots, heads, state_keys = layout_slots(layout, flat, norm_last_layer)
    in_dims = {"projector": backbone.num_features, "head": backbone.num_features, "head_dense": backbone.num_features}
    if "projector" in heads:
        in_dims["predictor"] = heads["projector"]["kwargs"]["out_dim"]
    report, consumed, variables = Report(), set(), {}
    for slot in slots:
        module = backbone if slot.kind == "backbone" else build_head(heads[slot.head])
        in_dim = None if slot.kind == "backbone" else in_dims[slot.head]
        abstract = init_variables(module, in_dim)
        kwargs = heads[slot.head]["kwargs"] if slot.head else {}
        loaded = _load_slot(flat, slot, abstract, kwargs, report, consumed, resize)
        if not strict and len(loaded) < len(traverse_util.flatten_dict(abstract)):
            for path, value in traverse_util.flatten_dict(init_variables(module, in_dim, seed, abstract=False)).items():
                loaded.setdefault(path, value)
        node = variables
        for part in slot.group[:-1]:
            node = node.setdefault(part, {})
        node[slot.group[-1]] = traverse_util.unflatten_dict(loaded)
    if state_keys:
        variables["obj_state"] = _import_obj_state(flat, state_keys, heads, report, consumed)
    for key in flat:
        if key not in consumed:
            if key.rsplit(".", 1)[-1] in IGNORED_BUFFERS or (drop_classifier and key in ("head.weight", "head.bias")):
                report.dropped += 1
            else:
                report.unexpected.append(f"{key} {_shape(np.shape(flat[key]))}")
    if report.problems and strict:
        hint = guess_architecture(flat)
        raise ConversionError(
            f"{source} does not fit model {model!r} (layout {layout!r}, {json.dumps(model_kwargs)}): "
            f"{report.summary()}\n"
            + report.details() + (f"\n  hint: the checkpoint looks like {hint}" if hint else "")
            + "\n  (use non-strict mode to load the matching tensors and keep the initialisation for the rest)")
    meta = dict(format=FORMAT, layout=layout, model=model, model_kwargs=model_kwargs, heads=heads, source=source,
                report=report.as_dict())
    return {"meta": meta, "variables": variables}


def import_checkpoint(path: str, model: str, layout: str = "auto", **kwargs) -> dict:
    """Reads a ``.pth`` and converts it (see :func:`import_state` for the keyword arguments)."""
    detected, flat = detect_layout(read_pth(path))
    if not flat:
        raise ConversionError(f"{path} holds no tensors (is it an optimizer- or args-only file?)")
    if layout != "auto" and layout != detected and {layout, detected} != {"esvit", "dino"}:  # (prefix decides)
        raise ConversionError(f"{path} has the {detected!r} layout, not {layout!r}")
    return import_state(flat, model, detected, source=path, **kwargs)


def guess_architecture(flat: Mapping[str, np.ndarray]) -> str | None:
    """Names the backbone a flat state dict looks like (for error messages), e.g. ``swin_tiny (Swin, C=96, ...)``."""
    from swin_ssl.models import MODEL_NAMES, create_model
    for prefix in ("", "encoder.", "student.", "teacher.", "student.backbone.", "teacher.backbone.", "backbone."):
        proj = flat.get(prefix + "patch_embed.proj.weight")
        if proj is not None and np.ndim(proj) == 4:
            break
    else:
        return None
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    keys = [k[len(prefix):] for k in flat if k.startswith(prefix)]
    if any(k.startswith("layers.") for k in keys):
        stages = sorted({int(k.split(".")[1]) for k in keys if k.startswith("layers.")})
        depths = tuple(len({k.split(".")[3] for k in keys if k.startswith(f"layers.{i}.blocks.")}) for i in stages)
        fields = dict(embed_dim=dim, depths=depths, patch_size=patch)
        desc = f"Swin (embed_dim={dim}, depths={depths}, patch={patch})"
    elif any(k.startswith("blocks.") for k in keys):
        depth = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
        fields = dict(embed_dim=dim, depth=depth, patch_size=patch)
        desc = f"ViT/DeiT (embed_dim={dim}, depth={depth}, patch={patch})"
    else:
        return None
    names = [n for n in MODEL_NAMES if all(tuple(getattr(create_model(n), f, None)) == v if isinstance(v, tuple)
                                           else getattr(create_model(n), f, None) == v for f, v in fields.items())]
    return (" / ".join(names) + " = " if names else "") + desc


# ----------------------------------------------------------------------------------------------
# Export

def _regenerate_buffers(state: dict, module, attn_mask: bool) -> None:
    from swin_ssl.models.swin import relative_position_index, shifted_window_mask, stage_geometry
    for key in [k for k in state if k.endswith("attn.relative_position_bias_table")]:
        window = (math.isqrt(state[key].shape[0]) + 1) // 2
        state[key.replace("relative_position_bias_table", "relative_position_index")] = \
            relative_position_index(window).astype(np.int64)
    if attn_mask:
        h, w = (-(-s // module.patch_size) for s in _input_size(module))
        for i, (window, shift) in enumerate(stage_geometry(_input_size(module), module.patch_size,
                                                          module.window_size, len(module.depths))):
            hp, wp = -(-h // window) * window, -(-w // window) * window
            for j in range(1, module.depths[i], 2):
                if shift:
                    state[f"layers.{i}.blocks.{j}.attn_mask"] = shifted_window_mask(hp, wp, window, shift).copy()
            h, w = -(-h // 2), -(-w // 2)


def export_slot(variables: Mapping, kind: str = "backbone", head_kwargs: Mapping | None = None, prefix: str = "",
                module=None, attn_mask: bool = False) -> dict[str, np.ndarray]:
    """Flax variables of one module -> flat torch state dict (NumPy), buffers regenerated."""
    from flax import traverse_util
    head_kwargs = head_kwargs or {}
    state = {}
    for path, arr in traverse_util.flatten_dict({k: v for k, v in dict(variables).items()
                                                 if k in ("params", "batch_stats")}).items():
        arr = np.asarray(arr)
        key, to_torch, _ = _torch_key(kind, head_kwargs, tuple(path), arr.ndim)
        state[key] = np.ascontiguousarray(to_torch(arr))
    if kind == "backbone" and any(k.endswith("relative_position_bias_table") for k in state):
        if attn_mask and module is None:
            raise ValueError("attn_mask=True needs the backbone module (its image and window size)")
        _regenerate_buffers(state, module, attn_mask)
    if kind == "dino_head" and head_kwargs.get("norm_last_layer"):
        state["last_layer.weight_g"] = np.ones((head_kwargs["out_dim"], 1), np.float32)
    if kind == "moby_mlp":  # unused by momentum-0.1 BN, written so strict PyTorch loaders find every key
        for key in [k for k in state if k.endswith("running_mean")]:
            state[key.replace("running_mean", "num_batches_tracked")] = np.array(0, np.int64)
    return {prefix + k: v for k, v in state.items()}


def _backbone_of(variables: Mapping, which: str, what: str):
    if which == "backbone" and "backbone" in variables:
        return variables["backbone"]
    if which in variables and which != "obj_state" and "backbone" in variables[which]:
        return variables[which]["backbone"]
    raise ConversionError(f"{what}: no backbone {which!r}; groups: {sorted(k for k in variables if k != 'obj_state')}")


def export_state(converted: Mapping, which: str | None = None, attn_mask: bool = False) -> dict:
    """Converted dict -> the torch checkpoint object: the full source layout, or ``{'model': backbone}``
    for ``which``."""
    meta, variables = converted["meta"], converted["variables"]
    module = build_backbone(meta["model"], meta["model_kwargs"])
    if which is not None or meta["layout"] == "backbone":
        bb = _backbone_of(variables, which or "backbone", f"this {meta['layout']} file")
        return {"model": export_slot(bb, module=module, attn_mask=attn_mask)}
    slots, heads = layout_slots_from_meta(meta, variables)
    out = {}
    for slot in slots:
        kw = heads[slot.head]["kwargs"] if slot.head else {}
        node = variables[slot.group[0]][slot.group[1]]
        if meta["layout"] == "moby":
            out.update(export_slot(node, slot.kind, kw, slot.prefix, module, attn_mask))
        else:  # student keys carry DDP's "module." prefix in the official files
            group = slot.group[0]
            prefix = ("module." if group == "student" else "") + slot.prefix[len(group) + 1:]
            out.setdefault(group, {}).update(export_slot(node, slot.kind, kw, prefix, module, attn_mask))
    state = _export_obj_state(variables.get("obj_state", {}))
    if meta["layout"] == "moby":
        return {"model": {**out, **state}}
    return {**out, **({"dino_loss": state} if state else {})}


def layout_slots_from_meta(meta: Mapping, variables: Mapping):
    heads = meta["heads"]
    if meta["layout"] == "moby":
        return MOBY_SLOTS, heads
    bb = "backbone." if meta["layout"] == "dino" else ""
    slots = []
    for group in ("student", "teacher"):
        if group in variables:
            slots.append(Slot((group, "backbone"), f"{group}.{bb}", "backbone"))
            slots += [Slot((group, name), f"{group}.{name}.", "dino_head", name)
                      for name in heads if name in variables[group]]
    return slots, heads


def export_backbone(variables: Mapping, model, path: str, model_kwargs: Mapping | None = None,
                    attn_mask: bool = False) -> None:
    """Writes Flax backbone variables (e.g. the EsViT teacher after pretraining) as an official ``{'model': ...}`` .pth.

    ``model``: a model name for ``create_model`` or the module itself. Swin keys follow the official
    classification / detection layout (downsample at the end of stages 0-2, ``head.*``); ViT keys the timm/DeiT one.
    """
    module = build_backbone(model, model_kwargs) if isinstance(model, str) else model
    if "params" not in variables:
        variables = {"params": variables}
    write_pth({"model": export_slot(variables, module=module, attn_mask=attn_mask)}, path)


def export_workdir(workdir: str, path: str, network: str = "default", step: int | None = None,
                   attn_mask: bool = False) -> dict:
    """A training run's backbone (``network``: "online", "target" = EMA teacher, or "default" = the objective's
    evaluation choice) -> official ``{'model': ...}`` .pth; returns the run's meta."""
    from swin_ssl import checkpoint
    ckpt = checkpoint.load_backbones(workdir, step)
    if network not in ("online", "target", "default"):
        raise ConversionError(f"network must be online, target or default, got {network!r}")
    meta, cfg = ckpt["meta"], ckpt["meta"].get("config") or {}
    kwargs = dict((cfg.get("model") or {}).get("overrides") or {})
    if (cfg.get("data") or {}).get("image_size"):
        kwargs["img_size"] = int(cfg["data"]["image_size"])
    export_backbone({"params": ckpt[network]}, meta["model"], path, kwargs, attn_mask)
    return meta


# ----------------------------------------------------------------------------------------------
# Converted files

def save_converted(converted: Mapping, path: str) -> None:
    from flax import serialization
    payload = {**converted["variables"], "meta": json.dumps(converted["meta"])}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(payload))


def load_converted(path: str) -> dict:
    from flax import serialization
    if not os.path.isfile(path):
        raise FileNotFoundError(f"converted file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        variables = serialization.msgpack_restore(data)
        meta = json.loads(variables.pop("meta"))
    except Exception as e:
        raise ConversionError(f"{path} is not a swin_ssl converted file (.msgpack from `python -m swin_ssl.convert "
                              f"import`), or it is truncated: {e}") from e
    if meta.get("format") != FORMAT:
        raise ConversionError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    return {"meta": meta, "variables": variables}


def load_backbone_from(converted: Mapping, which: str | None = None, what: str = "converted file"):
    """(module, variables) of a converted dict's backbone: default MoBY online encoder, EsViT/DINO teacher."""
    meta, variables = converted["meta"], converted["variables"]
    bb = _backbone_of(variables, which or DEFAULT_BACKBONE[meta["layout"]], what)
    return build_backbone(meta["model"], meta["model_kwargs"]), bb


def train_state_parts(converted: Mapping) -> dict:
    """``params``, ``target_params``, ``batch_stats`` and ``obj_state`` as ``swin_ssl.train.state.TrainState`` holds
    them (MoBY: online/target, EsViT/DINO: student/teacher), so a run can continue from an official checkpoint.

    The optimizer state and step are not converted (start them fresh, or set the step from the source epoch).
    """
    meta, variables = converted["meta"], converted["variables"]
    groups = {"moby": ("online", "target"), "esvit": ("student", "teacher"), "dino": ("student", "teacher")}
    if meta["layout"] not in groups:
        raise ConversionError(f"a {meta['layout']} checkpoint holds no SSL training state (only a backbone)")
    parts = {}
    for field, group in zip(("params", "target"), groups[meta["layout"]]):
        if group not in variables:
            raise ConversionError(f"the checkpoint has no {group!r} network (groups: {sorted(variables)})")
        parts[field] = {name: mod["params"] for name, mod in variables[group].items()}
        parts[field + "_stats"] = {name: mod["batch_stats"] for name, mod in variables[group].items()
                                   if "batch_stats" in mod}
    return dict(params=parts["params"], target_params=parts["target"], obj_state=dict(variables.get("obj_state", {})),
                batch_stats={"online": parts["params_stats"], "target": parts["target_stats"]})


def load_backbone(path: str, which: str | None = None):
    """(module, variables) of a converted file's backbone, ready for ``module.apply(variables, images)``."""
    return load_backbone_from(load_converted(path), which, path)


# ----------------------------------------------------------------------------------------------
# CLI

def _count(tree) -> int:
    import jax
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(tree))


def _parse_bool(s: str):
    return {"auto": None, "true": True, "false": False}[s.lower()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m swin_ssl.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="official .pth -> converted .msgpack")
    imp.add_argument("checkpoint")
    imp.add_argument("--model", required=True, help="create_model name, e.g. swin_tiny, deit_small")
    imp.add_argument("--out", required=True)
    imp.add_argument("--layout", default="auto", choices=["auto", "backbone", "moby", "esvit", "dino"])
    imp.add_argument("--num-classes", type=int, default=None,
                     help="default: from head.weight (plain backbones), else 0; 0 drops a classifier")
    imp.add_argument("--window-size", type=int, default=None, help="Swin window (tables are resized bicubically)")
    imp.add_argument("--img-size", type=int, default=None,
                     help="configured resolution (ViT position embeddings are resized)")
    imp.add_argument("--norm-eps", type=float, default=None, help="LayerNorm eps (default: model's; 1e-6 for esvit)")
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
    exp.add_argument("--step", type=int, default=None, help="workdir: checkpoint step (default: latest)")
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
        elif args.command == "export" and os.path.isdir(args.source):
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
    except (ConversionError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The PyTorch key layouts (official Swin, timm Swin, DeiT/ViT, MoBY, EsViT, DINO) and the name mapping
between a Flax variable path and a torch key.

Layout rules: Linear ``(out, in)`` -> ``kernel (in, out)``; Conv ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``;
the fused qkv keeps its ``(3, heads, head_dim)`` row order as kernel columns (the Flax attention reshapes
the same way); LayerNorm/BatchNorm ``weight``/``bias`` -> ``scale``/``bias``, BN ``running_mean|var`` ->
``batch_stats`` ``mean|var``; DINO ``weight_v (out, in)`` -> ``kernel_v (in, out)``, ``weight_g (out, 1)`` ->
``scale_g (out,)`` (absent when ``norm_last_layer``: g must then be all ones).

A checkpoint is a list of :class:`Slot` s (one module each: backbone, MoBY MLP or DINO head); the head
architectures are inferred from the tensor shapes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

from swin_ssl.convert.errors import ConversionError

DEFAULT_BACKBONE = {"backbone": "backbone", "moby": "online", "esvit": "teacher", "dino": "teacher"}


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


def torch_key(kind: str, head_kwargs: Mapping, path: tuple[str, ...], ndim: int):
    collection, *mods, leaf = path
    name, to_torch, from_torch = _leaf_rule(collection, leaf, ndim)
    return ".".join([_module_name(kind, head_kwargs, m) for m in mods] + [name]), to_torch, from_torch


# ----------------------------------------------------------------------------------------------
# Slots and layouts

@dataclasses.dataclass
class Slot:
    """One module of a checkpoint: where it sits in the variables tree and under which torch key prefix."""
    group: tuple[str, ...]
    prefix: str
    kind: str  # "backbone" | "moby_mlp" | "dino_head"
    head: str | None = None  # key of meta["heads"]


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


# ----------------------------------------------------------------------------------------------
# Reading the tree back: which group holds a backbone, which architecture a state dict looks like

def backbone_of(variables: Mapping, which: str, what: str):
    if which == "backbone" and "backbone" in variables:
        return variables["backbone"]
    if which in variables and which != "obj_state" and "backbone" in variables[which]:
        return variables[which]["backbone"]
    raise ConversionError(f"{what}: no backbone {which!r}; groups: {sorted(k for k in variables if k != 'obj_state')}")


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

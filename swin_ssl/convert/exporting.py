"""Export: Flax variables (a converted dict, a backbone, a training workdir) -> official PyTorch ``.pth`` state.

The buffers dropped on import (``relative_position_index``, optionally ``attn_mask``; ``num_batches_tracked``
of MoBY's BatchNorm) are regenerated so strict PyTorch loaders find every key.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from swin_ssl.convert.errors import ConversionError
from swin_ssl.convert.layouts import backbone_of, layout_slots_from_meta, torch_key
from swin_ssl.convert.modules import build_backbone, input_size
from swin_ssl.convert.pth import write_pth


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


def _regenerate_buffers(state: dict, module, attn_mask: bool) -> None:
    from swin_ssl.models.swin import relative_position_index, shifted_window_mask, stage_geometry
    for key in [k for k in state if k.endswith("attn.relative_position_bias_table")]:
        window = (math.isqrt(state[key].shape[0]) + 1) // 2
        state[key.replace("relative_position_bias_table", "relative_position_index")] = \
            relative_position_index(window).astype(np.int64)
    if attn_mask:
        h, w = (-(-s // module.patch_size) for s in input_size(module))
        for i, (window, shift) in enumerate(stage_geometry(input_size(module), module.patch_size,
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
        key, to_torch, _ = torch_key(kind, head_kwargs, tuple(path), arr.ndim)
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


def export_state(converted: Mapping, which: str | None = None, attn_mask: bool = False) -> dict:
    """Converted dict -> the torch checkpoint object: the full source layout, or ``{'model': backbone}``
    for ``which``."""
    meta, variables = converted["meta"], converted["variables"]
    module = build_backbone(meta["model"], meta["model_kwargs"])
    if which is not None or meta["layout"] == "backbone":
        bb = backbone_of(variables, which or "backbone", f"this {meta['layout']} file")
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
    from swin_ssl.evaluators.loading import load_network
    if network not in ("online", "target", "default"):
        raise ConversionError(f"network must be online, target or default, got {network!r}")
    module, params, meta = load_network(workdir, network, step)
    export_backbone({"params": params}, module, path, attn_mask=attn_mask)
    return meta

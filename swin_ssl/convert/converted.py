"""The converted file: writing and reading it, and what callers take out of it (a backbone, train-state parts).

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
"""
from __future__ import annotations

import json
from typing import Mapping

from swin_ssl import storage

from swin_ssl.convert.errors import ConversionError
from swin_ssl.convert.layouts import DEFAULT_BACKBONE, backbone_of
from swin_ssl.convert.modules import build_backbone

FORMAT = "swin_ssl.convert/1"


def save_converted(converted: Mapping, path: str) -> None:
    """Writes the converted file atomically (a reader sees the old file or the new one, never half of one)."""
    from flax import serialization
    payload = {**converted["variables"], "meta": json.dumps(converted["meta"])}
    storage.atomic_write_bytes(path, serialization.msgpack_serialize(payload))


def load_converted(path: str) -> dict:
    from flax import serialization
    p = storage.as_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"converted file not found: {path}")
    data = p.read_bytes()
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
    bb = backbone_of(variables, which or DEFAULT_BACKBONE[meta["layout"]], what)
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

"""Import: a flat ``{torch key: array}`` (or a ``.pth``) -> a converted dict ``{"meta", "variables"}``.

Loading is strict by default: every missing, unexpected or mis-shaped tensor is listed in one error naming the
file and the model. Buffers (``relative_position_index``, ``attn_mask``, ``num_batches_tracked``) are dropped;
mis-shaped relative-position tables and position embeddings are resized (``swin_ssl.convert.resize``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import numpy as np

from swin_ssl.convert.converted import FORMAT
from swin_ssl.convert.errors import ConversionError
from swin_ssl.convert.layouts import Slot, detect_layout, guess_architecture, layout_slots, torch_key
from swin_ssl.convert.modules import build_backbone, build_head, init_variables
from swin_ssl.convert.pth import read_pth
from swin_ssl.convert.resize import try_resize

IGNORED_BUFFERS = ("relative_position_index", "attn_mask", "num_batches_tracked", "relative_coords_table")


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
        key, to_torch, from_torch = torch_key(slot.kind, head_kwargs, path, len(sds.shape))
        full = slot.prefix + key
        want = to_torch(np.broadcast_to(np.int8(0), sds.shape)).shape  # a view: no allocation
        if full not in flat:
            report.missing.append(f"{full} {_shape(want)}")
            continue
        consumed.add(full)
        arr = np.asarray(flat[full])
        if arr.shape != want:
            fixed = try_resize(full, arr, want) if resize else None
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
            if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer) or int(arr.reshape(-1)[0]) < 0:
                report.mismatched.append(f"{key}: {_shape(arr.shape)} {arr.dtype} is not one non-negative integer")
            else:
                out["ptr"] = np.asarray(arr.reshape(-1)[0], np.int32)
            continue
        head, axis = expect.get(name, (None, 0))
        dim = heads[head]["kwargs"]["out_dim"] if head in heads else None
        if arr.ndim != 2 or (dim is not None and arr.shape[axis] != dim) or (axis == 1 and arr.shape[0] != 1):
            report.mismatched.append(f"{key}: {_shape(arr.shape)} does not fit the {head} ({dim} outputs)")
            continue
        out[name] = np.ascontiguousarray(arr.T) if axis == 0 else arr.reshape(-1)
    return out


def _count(tree) -> int:
    import jax
    return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree_util.tree_leaves(tree))


def _check_inferred_size(what: str, abstract, flat: Mapping, source: str) -> None:
    """A module whose sizes were read off the file's tensor shapes cannot hold more values than the file: a crafted
    shape (say [2**40, 0], which stores nothing) must not make the import allocate it."""
    stored = sum(int(np.size(v)) for v in flat.values())
    count = _count(abstract)
    if count > stored:
        raise ConversionError(f"{source}: {what} would have {count:,} parameters but the file holds only "
                              f"{stored:,} values: its shapes are not those of a real checkpoint")


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
        model_kwargs.setdefault("norm_eps", 1e-6)  # EsViT's Swin uses LayerNorm eps 1e-6 (docs/fidelity.md)
    classifier = layout == "backbone" and np.ndim(flat.get("head.weight")) == 2
    drop_classifier = classifier and model_kwargs.get("num_classes") == 0  # asked for explicitly: drop head.*
    inferred_classes = classifier and model_kwargs.get("num_classes") is None
    if model_kwargs.get("num_classes") is None:
        model_kwargs.pop("num_classes", None)
        if classifier:
            model_kwargs["num_classes"] = int(flat["head.weight"].shape[0])
    backbone = build_backbone(model, model_kwargs)
    if inferred_classes:
        head = {k: v for k, v in init_variables(backbone)["params"].items() if k == "head"}
        _check_inferred_size(f"the classifier inferred from 'head.weight' {_shape(flat['head.weight'].shape)}", head,
                             flat, source)
    slots, heads, state_keys = layout_slots(layout, flat, norm_last_layer)
    in_dims = {"projector": backbone.num_features, "head": backbone.num_features, "head_dense": backbone.num_features}
    if "projector" in heads:
        in_dims["predictor"] = heads["projector"]["kwargs"]["out_dim"]
    report, consumed, variables = Report(), set(), {}
    for slot in slots:
        module = backbone if slot.kind == "backbone" else build_head(heads[slot.head])
        in_dim = None if slot.kind == "backbone" else in_dims[slot.head]
        abstract = init_variables(module, in_dim)
        if slot.head:
            _check_inferred_size(f"the {slot.head} head inferred from the tensors under {slot.prefix!r} "
                                 f"({json.dumps(heads[slot.head]['kwargs'])})", abstract, flat, source)
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

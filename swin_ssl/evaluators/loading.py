"""The one way to a stored backbone: :func:`load_network` (a training workdir or a params / converted file ->
module, parameters, meta) and, under it, :func:`load_backbone` (random init, a params file or a restored
checkpoint tree -> parameters for a given module).

Every path ends in ``check_params``: the loaded tree must have exactly the parameter names and shapes the
configured model expects, or loading stops with a message naming the missing, unexpected and mis-shaped
parameters. A silent partial load would evaluate a network that was never loaded (k-NN at chance level), so
``strict=False`` loading is never done here.
"""
from __future__ import annotations

import io
import json
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from swin_ssl import storage

PyTree = Any

# Where each network's backbone sits in what this project writes: a training checkpoint
# (``swin_ssl.train.state.TrainState``) and a converted file (``swin_ssl.convert``: MoBY online/target,
# EsViT/DINO student/teacher). Backbone-only files hold ``{"backbone": {"params"}}`` (converted), ``{"params"}``
# or the bare parameter tree.
NETWORK_PATHS = {"online": (("params", "backbone"), ("online", "backbone", "params"), ("student", "backbone", "params")),
                 "target": (("target_params", "backbone"), ("target", "backbone", "params"),
                            ("teacher", "backbone", "params"))}
BACKBONE_ONLY_PATHS = (("backbone", "params"), ("params",))


class ParamMismatchError(ValueError):
    """The loaded parameters do not fit the configured model (names the offending parameters)."""


def flatten(tree: PyTree) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}`` for nested mappings / flax FrozenDicts."""
    tree = flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_params(expected: PyTree, loaded: PyTree, what: str = "checkpoint", limit: int = 20) -> None:
    """Raises ParamMismatchError unless ``loaded`` has exactly ``expected``'s names and shapes."""
    exp, got = flatten(expected), flatten(loaded)
    missing = sorted(set(exp) - set(got))
    unexpected = sorted(set(got) - set(exp))
    shaped = sorted(k for k in set(exp) & set(got) if tuple(np.shape(exp[k])) != tuple(np.shape(got[k])))
    if not (missing or unexpected or shaped):
        return

    def listing(names, fmt=str):
        more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(fmt(n) for n in names[:limit]) + more

    lines = [f"{what} does not match the configured model ({len(exp)} expected parameters, {len(got)} loaded):"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {listing(unexpected)}")
    if shaped:
        lines.append(f"  mis-shaped ({len(shaped)}): " + listing(
            shaped, lambda k: f"{k} expected {tuple(np.shape(exp[k]))} got {tuple(np.shape(got[k]))}"))
    lines.append("  (wrong model name/variant for this checkpoint, or a checkpoint of another network?)")
    raise ParamMismatchError("\n".join(lines))


def _as_dict(tree: Any) -> Any:
    """TrainState-like dataclasses -> dicts, so one lookup handles states and restored raw checkpoints."""
    if hasattr(tree, "__dataclass_fields__") and not isinstance(tree, Mapping):
        return {f: getattr(tree, f) for f in tree.__dataclass_fields__ if hasattr(tree, f)}
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = _as_dict(tree)
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return _as_dict(tree)


def select_network(tree: PyTree, network: str) -> PyTree:
    """The backbone of ``network`` ("online" | "target") inside a train state, a restored checkpoint or a converted
    file (``NETWORK_PATHS``); backbone-only trees are returned without their ``backbone`` / ``params`` wrapper."""
    if network not in NETWORK_PATHS:
        raise ValueError(f"network must be 'online' or 'target', got {network!r}")
    tree = _as_dict(tree)
    for path in NETWORK_PATHS[network]:
        found = _get(tree, path)
        if found is not None:
            return found
    if any(_get(tree, path) is not None for paths in NETWORK_PATHS.values() for path in paths):
        keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ParamMismatchError(f"checkpoint has no {network} network (top-level keys: {keys})")
    for path in BACKBONE_ONLY_PATHS:
        found = _get(tree, path)
        if found is not None:
            return found
    return tree


def load_params_file(path: str) -> PyTree:
    """A parameter tree from ``.npz`` (flat "a/b/c" keys), ``.msgpack`` (flax serialization) or an orbax directory;
    ``path`` may be a URL (``gs://...``)."""
    file = storage.as_path(path)
    if file.is_dir():
        import orbax.checkpoint as ocp
        return ocp.StandardCheckpointer().restore(file)
    if file.name.endswith(".npz"):
        with np.load(io.BytesIO(file.read_bytes()), allow_pickle=False) as f:
            return unflatten({k: f[k] for k in f.files})
    if file.name.endswith(".msgpack"):
        return flax.serialization.msgpack_restore(file.read_bytes())
    raise ValueError(f"unknown params file format {path!r}: use .npz, .msgpack or an orbax checkpoint directory")


def split_file_meta(tree: PyTree) -> tuple[PyTree, dict]:
    """``(tree without "meta", meta)`` of a params file. ``swin_ssl.convert`` files carry a JSON ``meta`` (model,
    model_kwargs, layout); it is returned in the trainer's meta format (``model``, ``eval_backbone``,
    ``config.model``) so the evaluators rebuild the backbone the same way for both kinds of checkpoint."""
    if not isinstance(tree, Mapping) or "meta" not in tree:
        return tree, {}
    tree = dict(tree)
    raw = tree.pop("meta")
    m = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
    layout = m.get("layout")
    return tree, {"model": m.get("model"), "layout": layout,
                  "eval_backbone": {"moby": "online", "esvit": "target", "dino": "target"}.get(layout),
                  "config": {"model": {"name": m.get("model"), "overrides": dict(m.get("model_kwargs") or {})}}}


def save_params_file(path: str, params: PyTree) -> None:
    """Writes ``params`` as ``.npz`` or ``.msgpack`` (the formats ``load_params_file`` reads), atomically."""
    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(params)).items()}
    if path.endswith(".npz"):
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        storage.atomic_write_bytes(path, buffer.getvalue())
    elif path.endswith(".msgpack"):
        storage.atomic_write_bytes(path, flax.serialization.msgpack_serialize(unflatten(flat)))
    else:
        raise ValueError(f"save_params_file: use a .npz or .msgpack path, got {path!r}")


def restore_workdir(workdir: str, step: int | None = None) -> tuple[PyTree, dict]:
    """``(state tree, meta)`` of a training workdir's checkpoint (latest step unless ``step``), as NumPy dicts.

    ``meta`` (written by the trainer) has ``model``, ``objective``, ``eval_backbone`` and the training ``config``.
    """
    from swin_ssl import checkpoint as ckpt_lib
    return ckpt_lib.restore_raw(workdir, step)


def expected_params(model: Any, image_shape: tuple[int, ...]) -> PyTree:
    """Shapes/dtypes of the model's parameters (no allocation)."""
    images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x), images)["params"]


def cast_like(expected: PyTree, loaded: PyTree) -> PyTree:
    """Loaded leaves as jax arrays with the expected dtypes, in the expected tree structure."""
    got = flatten(loaded)
    return unflatten({k: jnp.asarray(np.asarray(got[k]), dtype=v.dtype) for k, v in flatten(expected).items()})


def load_backbone(model: Any, image_shape: tuple[int, ...], *, init: str, network: str = "target",
                  tree: PyTree | None = None, params_path: str = "", what: str = "", seed: int = 0) -> PyTree:
    """Backbone params for ``model``: ``init`` is "random_init" | "params_file" | "checkpoint".

    For "checkpoint" pass the restored state ``tree`` (``restore_workdir``); for "params_file" the ``params_path``
    (or the already loaded ``tree``).
    ``network`` picks the online or the target (EMA teacher) backbone where the tree holds both.
    Raises ParamMismatchError (naming the parameters) when the loaded tree does not match the model.
    """
    expected = expected_params(model, image_shape)
    if init == "random_init":
        images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
        return jax.jit(lambda x: model.init({"params": jax.random.PRNGKey(seed)}, x))(images)["params"]
    if init == "params_file":
        if tree is None:
            if not params_path:
                raise ValueError("init='params_file' needs params_path")
            tree = split_file_meta(load_params_file(params_path))[0]
        what = what or f"params file {params_path}"
    elif init == "checkpoint":
        if tree is None:
            raise ValueError("init='checkpoint' needs the restored checkpoint tree")
        what = what or f"{network} network of the checkpoint"
    else:
        raise ValueError(f"init must be 'random_init', 'params_file' or 'checkpoint', got {init!r}")
    tree = select_network(tree, network)
    check_params(expected, tree, what)
    return cast_like(expected, tree)


def load_network(source: str, network: str = "default", step: int | None = None) -> tuple[Any, PyTree, dict]:
    """``(module, params, meta)`` of a stored backbone: a training workdir's checkpoint (latest, or ``step``) or a
    params / converted file (``.msgpack`` from ``swin_ssl.convert``, ``.npz``, orbax directory) with its meta.

    ``network``: "online", "target" (EMA teacher) or "default" (the objective's choice, ``meta["eval_backbone"]``).
    The module is built by ``swin_ssl.models.from_config`` from the stored config, so it has the training geometry;
    the parameters pass ``check_params``. ``meta`` gains ``network`` (the one chosen).
    """
    from swin_ssl import checkpoint
    from swin_ssl.models import from_config, input_size

    if storage.as_path(checkpoint.checkpoint_dir(source)).is_dir():
        tree, meta = restore_workdir(source, step)
        init = "checkpoint"
    else:
        tree, meta = split_file_meta(load_params_file(source))
        init = "params_file"
    stored = meta.get("config") or {}
    model_cfg = {"name": meta.get("model"), **(stored.get("model") or {})}
    if not model_cfg["name"]:
        raise ValueError(f"{source} names no model (a training workdir or a swin_ssl.convert file does); use "
                         "evaluate.py with --config.model.name")
    network = (meta.get("eval_backbone") or "target") if network == "default" else network
    module = from_config(model_cfg, (stored.get("data") or {}).get("image_size"))
    params = load_backbone(module, (*input_size(module), module.in_chans), init=init, network=network, tree=tree,
                           what=f"{network} network of {source}")
    return module, params, dict(meta, network=network)

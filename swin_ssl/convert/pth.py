"""Reading and writing PyTorch ``.pth`` files as nested dicts of NumPy arrays.

``.pth`` files are read with ``torch.load(weights_only=True)`` (torch: ``pip install torch==2.13.0``). Official
MoBY files also pickle a yacs config, which that refuses; they are then read by a restricted unpickler that
rebuilds tensors and plain containers only and keeps every other pickled object as inert data (nothing imported
or called). Files that name blocked modules (``os``, ...) are refused. torch is imported only when a file is read
or written, so the rest of the package works without it.
"""
from __future__ import annotations

import argparse
import os
import types
import zipfile
from typing import Any, Mapping

import numpy as np

from swin_ssl.convert.errors import ConversionError

TORCH_HINT = "pip install torch==2.13.0 (or the project's extra: pip install -e '.[torch]')"


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

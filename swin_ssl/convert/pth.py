"""Reading and writing PyTorch ``.pth`` files as nested dicts of NumPy arrays.

``.pth`` files are read with ``torch.load(weights_only=True)`` (torch: ``pip install torch==2.13.0``). Official
MoBY files also pickle a yacs config, which that refuses; they are then read by a restricted unpickler that
rebuilds tensors and plain containers only and keeps every other pickled object as inert data (nothing imported
or called). A file whose pickle names a global of a module that can run code (``os``, ``subprocess``, ``builtins``'
functions, ...; see ``_BLOCKED_MODULES``) anywhere is refused, whatever comes before it.

A file is untrusted input: its bytes are read once (both loaders see the same bytes); TorchScript archives and
zip entries that are compressed (``torch.save`` never compresses) are refused before unpickling; every tensor is
checked before it is copied: dense, a dtype NumPy holds, and no more elements than its storage holds (an
expanded or zero-stride view would otherwise be materialised). Each failure is a ``ConversionError`` naming the
file and the tensor. torch is imported only when a file is read or written, so the rest of the package works
without it.
"""
from __future__ import annotations

import argparse
import io
import pickle
import types
import zipfile
from typing import Any, Mapping

import numpy as np

from swin_ssl import storage
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


# Top-level modules whose globals can run code or touch the system: a file of tensors never names them.
_BLOCKED_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil", "socket", "importlib", "runpy",
    "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "multiprocessing", "signal",
    "operator", "functools", "inspect", "pdb", "timeit", "tempfile", "threading", "_thread", "asyncio", "urllib",
    "http", "ftplib", "smtplib", "requests"})


class BlockedGlobal(pickle.UnpicklingError):
    """The pickle names a global of a blocked module."""


def _restricted_pickle_module():
    """A pickle module whose Unpickler builds tensors and plain containers only; any other global becomes _Opaque,
    and a global of a blocked module stops the load (``BlockedGlobal``).

    Official MoBY checkpoints pickle a yacs ``CfgNode`` under ``config``, which ``weights_only=True`` refuses
    (torch allows SETITEMS only on real dicts). This fallback keeps the same safety: it imports nothing else.
    """
    import torch  # noqa: F401  (the rebuild helpers below live in torch)

    allowed = {("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_tensor",
                                              "_rebuild_parameter", "_rebuild_parameter_with_state")}
    allowed |= {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset")}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return super().find_class(module, name)
            if module.split(".")[0] in _BLOCKED_MODULES:
                raise BlockedGlobal(f"{module}.{name}")
            return type(f"Opaque[{module}.{name}]", (_Opaque,), {})

    mod = types.ModuleType("swin_ssl_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()
    mod.__name__ = "swin_ssl_restricted_pickle"
    return mod


def _read_bytes(path: str) -> bytes:
    """The file's bytes, read once: both loaders then see the same bytes."""
    p = storage.as_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found (or not a regular file): {path}")
    return p.read_bytes()


def _check_archive(path: str, data: bytes) -> None:
    """Refuses what is not a checkpoint before anything is unpickled: TorchScript, compressed or broken zips."""
    if data[:4] == b"PK\x03\x04":  # torch.save's zip format
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                entries = z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ConversionError(f"{path}: the zip archive torch.save writes is unreadable ({e}); "
                                  f"the file is truncated or corrupted (size {len(data)} bytes)") from e
        names = [e.filename for e in entries]
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            raise ConversionError(f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint: refused "
                                  "(loading it would run its code)")
        packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise ConversionError(f"{path}: zip entry {packed[0]!r} is compressed, which torch.save never writes "
                                  "(a compressed entry can expand far beyond the file): refused")
    elif not data[:1] == b"\x80":  # legacy torch files start with a pickle protocol opcode
        raise ConversionError(f"{path} is not a PyTorch checkpoint: it starts with {data[:8]!r}, expected a zip "
                              "archive (torch.save) or a legacy pickle")


# dtypes NumPy holds (bfloat16 is widened to float32); fp8, complex, quantized and the rest are refused.
_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def _tensor_to_numpy(t, where: str) -> np.ndarray:
    """One tensor -> NumPy, after the checks that keep a crafted tensor from allocating more than the file holds."""
    import torch
    t = t.detach()
    if t.layout != torch.strided:
        raise ConversionError(f"tensor {where!r} is {t.layout} (sparse or another non-dense layout); only dense "
                              "tensors are read")
    if t.device.type != "cpu":
        raise ConversionError(f"tensor {where!r} is on device {t.device.type!r}, which holds no data here")
    dtype = str(t.dtype).replace("torch.", "")
    if dtype not in _DTYPES:
        raise ConversionError(f"tensor {where!r} has dtype {dtype}; only {', '.join(_DTYPES)} are read")
    stored = t.untyped_storage().nbytes()
    if t.numel() * t.element_size() > stored:
        raise ConversionError(f"tensor {where!r} of shape {list(t.shape)} has {t.numel():,} elements but its storage "
                              f"holds {stored:,} bytes (an expanded or zero-stride view): refused rather than "
                              "materialised")
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _to_numpy(obj: Any, where: str = "") -> Any:
    import torch
    if isinstance(obj, torch.Tensor):
        return _tensor_to_numpy(obj, where or "<root>")
    if isinstance(obj, Mapping) and not isinstance(obj, _Opaque):
        return {k: _to_numpy(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_numpy(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def _load(data: bytes, **kwargs):
    import torch
    return torch.load(io.BytesIO(data), map_location="cpu", **kwargs)


def read_pth(path: str) -> dict:
    """``torch.load(weights_only=True)``, tensors -> NumPy; falls back to an equally restricted loader for metadata.

    Raises ``ConversionError`` (one line naming the file, and the tensor where one is at fault) for anything that
    is not a readable checkpoint of dense tensors.
    """
    data = _read_bytes(path)
    _check_archive(path, data)
    torch = require_torch()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = _load(data, weights_only=True)
    except pickle.UnpicklingError:  # a global or opcode weights_only refuses: decide with the restricted loader
        try:
            obj = _load(data, weights_only=False, pickle_module=_restricted_pickle_module())
        except BlockedGlobal as e2:
            raise ConversionError(f"{path} is refused: its pickle names the blocked global {e2} (a checkpoint "
                                  "never needs it; nothing was run)") from e2
        except Exception as e2:  # a damaged or crafted pickle can fail in any way: one line, never a traceback
            raise ConversionError(f"{path} could not be read as a PyTorch checkpoint: {_one_line(e2)}") from e2
    except Exception as e:  # truncated or crafted: torch raises RuntimeError, EOFError, ValueError, KeyError, ...
        raise ConversionError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupted?): "
                              f"{_one_line(e)}") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of tensors or a checkpoint dict")
    try:
        return _to_numpy(obj)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def write_pth(obj: Mapping, path: str) -> None:
    """``torch.save`` of a nested dict of NumPy arrays (arrays become tensors), written atomically."""
    torch = require_torch()

    def conv(o):
        if isinstance(o, np.ndarray):
            o = np.ascontiguousarray(o)
            return torch.from_numpy(o if o.flags.writeable else o.copy())
        if isinstance(o, Mapping):
            return {k: conv(v) for k, v in o.items()}
        return o
    buffer = io.BytesIO()
    torch.save(conv(obj), buffer)
    storage.atomic_write_bytes(path, buffer.getvalue())

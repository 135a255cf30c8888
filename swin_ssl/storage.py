"""Paths that may be local or remote (``gs://bucket/...`` and any scheme ``etils.epath`` handles).

Every file the project reads or writes goes through here, so a workdir, a checkpoint directory, a converter
output or a ``data_dir`` can be a Cloud Storage URL as well as a local folder. Local paths are expanded
(``~``) and made absolute; URLs are passed through untouched (``os.path.abspath("gs://b/r")`` would make a
local folder ``./gs:/b/r``).

Single-file writes are atomic: a local file is written under a temporary name in the same folder and renamed
over the target (a reader sees the old file or the new one, never half of one); on an object store one upload
is one object, which the store makes visible only when complete.
"""
from __future__ import annotations

import os
import uuid

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for URLs (``gs://...``, ``s3://...``), False for local paths."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """``epath.Path`` of a local path (expanded, absolute) or a URL (unchanged)."""
    path = os.fspath(path)
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(path)))


def join(path: PathLike, *parts: str) -> str:
    """``path/part/...`` as a string, for local paths and URLs alike."""
    return os.fspath(as_path(path).joinpath(*parts))


def atomic_write_bytes(path: PathLike, data: bytes) -> str:
    """Writes ``data`` to ``path`` so that it is complete or absent (never half-written); returns the path."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)  # one object upload: visible only once complete
        return os.fspath(target)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return os.fspath(target)


def atomic_write_text(path: PathLike, text: str) -> str:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def move(src: PathLike, dst: PathLike) -> str:
    """Moves a file or folder to ``dst``; object stores have no rename, so there every object is copied, then the
    source removed (a reader may briefly see both, never neither)."""
    src, dst = as_path(src), as_path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(src):
        os.replace(src, dst)
        return os.fspath(dst)
    for path in [p for p in src.rglob("*") if p.is_file()]:
        target = dst / os.fspath(path.relative_to(src))
        target.parent.mkdir(parents=True, exist_ok=True)
        path.copy(target)
    src.rmtree()
    return os.fspath(dst)

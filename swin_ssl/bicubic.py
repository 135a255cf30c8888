"""PyTorch's bicubic interpolation (``F.interpolate(mode="bicubic", align_corners=False)``: the a=-0.75 cubic,
no antialiasing, edge rows repeated) as one [n_out, n_in] matrix per axis, so a resize is two small matmuls.

Used by the ViT (position embeddings at other resolutions) and by the checkpoint converter (relative-position
tables, position embeddings), so both give the official code's numbers.
"""
from __future__ import annotations

import numpy as np


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, scale_factor: float | None = None) -> np.ndarray:
    """[n_out, n_in] matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis, for
    ``size=n_out`` or, given ``scale_factor``, for ``scale_factor=...`` (PyTorch then maps output pixels back with
    ``1 / scale_factor``, not ``n_in / n_out``)."""
    dst = np.arange(n_out)
    step = n_in / n_out if scale_factor is None else 1.0 / scale_factor
    src = (dst + 0.5) * step - 0.5
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

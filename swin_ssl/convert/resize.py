"""Bicubic resizing of relative-position tables (window change, e.g. 7 -> 14) and ViT position embeddings
(resolution change), with PyTorch's kernel (``F.interpolate(mode="bicubic", size=...)``, a=-0.75,
align_corners=False; ``swin_ssl.bicubic``), so resized tables equal the official loaders' results.
"""
from __future__ import annotations

import math

import numpy as np

from swin_ssl.bicubic import bicubic_matrix, resize_grid

__all__ = ["bicubic_matrix", "resize_grid", "resize_pos_embed", "resize_rel_pos_table", "try_resize"]


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


def try_resize(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    try:
        if name.endswith("relative_position_bias_table") and arr.ndim == 2 and arr.shape[1] == shape[1]:
            return resize_rel_pos_table(arr, shape[0])
        if name.endswith("pos_embed") and arr.ndim == 3 and arr.shape[::2] == shape[::2]:
            return resize_pos_embed(arr, shape[1])
    except ValueError:
        return None
    return None

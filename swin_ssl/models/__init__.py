"""Model factory: ``create_model(name, **overrides)`` -> a Linen module returning ``(out, features)``."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from swin_ssl.models.heads import DINOHead, MoBYMLP
from swin_ssl.models.swin import SwinTransformer
from swin_ssl.models.vit import VisionTransformer

_SWIN = {
    # Official configs (configs/swin/*.yaml). img_size decides the per-stage windows and shifts.
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    # CPU variants for 32-px images. swin_test: a few thousand params for unit tests (8x8 -> 4x4 tokens, W4:
    # stage 1 shifted, stage 2 clamped). swin_nano: the demo model, patch 2 -> 16x16, 8x8, 4x4 tokens.
    "swin_test": dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, img_size=32, mlp_ratio=2.0),
    "swin_nano": dict(embed_dim=48, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=4, patch_size=2,
                      img_size=32),
}
_VIT = {
    "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_test": dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=32, mlp_ratio=2.0),
}
MODEL_NAMES = tuple(sorted(_SWIN) + sorted(_VIT))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Returns the named backbone; ``overrides`` replace any module field (num_classes, drop_path_rate, dtype, ...)."""
    if name in _SWIN:
        cls, preset = SwinTransformer, _SWIN[name]
    elif name in _VIT:
        cls, preset = VisionTransformer, _VIT[name]
    else:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown option(s) {unknown}; {cls.__name__} takes {sorted(fields)}")
    return cls(**{**preset, **overrides})


# config ``model.dtype`` -> the matmul dtype of the modules.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def from_config(model_cfg: Mapping[str, Any], image_size: int | None, **fields: Any) -> nn.Module:
    """The backbone a config describes; the one place a backbone is built from a (training or stored) config.

    ``model_cfg``: ``name`` and optional ``overrides`` (extra module fields, e.g. window_size, norm_eps), as in
    ``config.model`` or a checkpoint's stored config. ``image_size`` (the training resolution, None = the preset's)
    becomes ``img_size``, which decides Swin's per-stage windows and shifts and ViT's stored position grid, so
    training, evaluation, conversion and export build the same geometry. ``overrides`` win over ``image_size``;
    ``fields`` (dtype, drop_path_rate, remat, ...) win over both. The classification head is off (num_classes=0).
    """
    base: dict[str, Any] = {"num_classes": 0}
    if image_size is not None:
        base["img_size"] = int(image_size)
    return create_model(model_cfg["name"], **{**base, **dict(model_cfg.get("overrides") or {}), **fields})


def input_size(module: nn.Module) -> tuple[int, int]:
    """(height, width) a backbone is configured for (``img_size``: an int or a pair)."""
    size = module.img_size
    return (size, size) if isinstance(size, int) else tuple(size)


__all__ = ["create_model", "from_config", "input_size", "DTYPES", "MODEL_NAMES", "SwinTransformer", "VisionTransformer", "MoBYMLP", "DINOHead"]

"""Optimizer and schedules from the config: AdamW + warmup/cosine lr, weight-decay schedule, clipping, freezing.

Every schedule is a pure function of the step, so a resumed run needs no scheduler state; optax keeps its own update counters in
``opt_state``, which start at 0 with ``state.step`` and advance with it, so a restored state continues the
schedules exactly.

The chain (what one update does, in order)::

    clip (global L2 norm | per-parameter-tensor L2 norm | none)
    -> scale_by_adam(b1, b2, eps)        (frozen tensors: their own instance, paused while frozen)
    -> add_decayed_weights(wd(step), mask = ndim >= 2 and not a bias)     # decoupled, as torch AdamW
    -> scale_by_learning_rate(lr(step))                                   # -lr * (adam + wd * p)
    -> freeze: zero the *updates* of params matching ``freeze_patterns`` while step < freeze_steps

Learning-rate schedule (:func:`warmup_cosine`): linear warmup from ``warmup_lr`` to ``peak`` over
``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``, with each official loop's step indexing:

* ``cosine_from_start=True`` reproduces MoBY's timm ``CosineLRScheduler(warmup_prefix=False, t_in_epochs=False)``:
  the cosine is ``min + (peak - min)(1 + cos(pi t / T)) / 2`` of the *global* step ``t``, so right after warmup
  the lr is already slightly below the peak (a small drop at ``t = warmup``), and the scheduler is advanced after
  each update, so update ``i`` uses its value at ``i - 1``. The MoBY configs use this.
* ``cosine_from_start=False`` (DINO/EsViT ``cosine_scheduler``): warmup ``linspace(warmup_lr, peak, W)``, then the
  cosine starts at the peak and runs over the remaining ``T - warmup`` steps; no drop.

One known difference stays (docs/fidelity.md): torch's clip_grad_norm_ divides by ``norm + 1e-6``,
``optax.clip_by_global_norm`` by ``norm``.

Weight decay: applied to every parameter with ``ndim >= 2`` (kernels, Swin's relative-position tables, ViT's
pos_embed/cls_token -- the MoBY wrapper has no no-weight-decay hooks) and never to biases or 1-D
parameters (LayerNorm/BN scales and offsets). ``no_decay_keywords`` excludes more by path substring.

Freezing (DINO's ``freeze_last_layer``): PyTorch drops the gradients, so AdamW skips the tensor
entirely: no decay, no moment update, and its per-parameter step counter does not advance, so the first update
after the freeze is a fresh Adam step (bias correction from t=1). Here the frozen tensors get their own
``scale_by_adam`` (``optax.multi_transform``) that is paused during the freeze (moments and count untouched), and
the final updates are masked (no step, no decay) -- the same arithmetic as PyTorch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from ml_collections import config_dict

from swin_ssl import config_rules as rules

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
CLIP_MODES = ("global", "per_param", "none")



def defaults() -> ml_collections.ConfigDict:
    """A fresh ``config.optim`` block (its placeholders are never shared between configs): MoBY's AdamW recipe
    (timm optimizer + scheduler), whose keys are the ones the trainer reads. The EsViT/DINO recipes change values."""
    return ml_collections.ConfigDict(dict(
        base_lr=1e-3, warmup_lr=5e-7, min_lr=5e-6, lr_batch_base=512,  # all scaled by batch_size / lr_batch_base
        scale_min_lr=True,
        cosine_from_start=True,  # timm CosineLRScheduler(warmup_prefix=False), stepped after each update
        b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.05, weight_decay_end=config_dict.placeholder(float),  # None: constant
        clip_mode="global", clip_norm=5.0,
        no_decay_keywords=(),
        decay_keywords=(),
        freeze_patterns=(), freeze_epochs=0.0, freeze_steps=config_dict.placeholder(int),
    ))


def check(config: ml_collections.ConfigDict) -> None:
    """The rules of ``config.optim`` (one-line ``ValueError`` naming the key)."""
    o = config.optim
    for key in ("base_lr", "warmup_lr", "min_lr", "weight_decay", "freeze_epochs"):
        rules.non_negative(f"optim.{key}", o[key])
    if o.get("weight_decay_end") is not None:
        rules.non_negative("optim.weight_decay_end", o.weight_decay_end)
    rules.positive("optim.lr_batch_base", o.lr_batch_base)
    rules.positive("optim.eps", o.eps)
    for key in ("b1", "b2"):
        rules.unit_interval(f"optim.{key}", o[key])
    if o.clip_mode not in CLIP_MODES:
        rules.fail("optim.clip_mode", o.clip_mode, "must be 'global', 'per_param' or 'none'")
    if o.clip_mode != "none":
        rules.positive("optim.clip_norm", o.clip_norm)


# ------------------------------------------------------------------------------------------------
# Schedules.

def warmup_cosine(peak: float, total_steps: int, warmup_steps: int = 0, warmup_init: float = 0.0,
                  end: float = 0.0, cosine_from_start: bool = False) -> Schedule:
    """The learning rate of update ``step`` (0-based): linear warmup ``warmup_init -> peak`` over ``warmup_steps``,
    then cosine ``-> end`` at ``total_steps``, indexed exactly as the official training loops apply it.

    ``cosine_from_start=True``: timm's ``CosineLRScheduler(warmup_prefix=False)`` value ``v(t)`` (cosine of the
    global step ``t / total``; warmup ``warmup_init + (peak - warmup_init) t / W``), which MoBY's loop sets *after*
    each ``optimizer.step()``: update ``i`` runs with ``v(i - 1)`` and update 0 with the initial ``v(0)``.
    ``cosine_from_start=False``: DINO/EsViT's ``cosine_scheduler`` array, read *before* each update: warmup
    ``linspace(warmup_init, peak, W)`` (the peak at ``W - 1``), then the cosine over the remaining steps.
    """
    total, warmup = max(int(total_steps), 1), int(warmup_steps)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        if cosine_from_start:
            t = jnp.maximum(t - 1.0, 0.0)  # the value timm set after the previous update
            progress, ramp_len = t / total, warmup
        else:
            progress, ramp_len = (t - warmup) / max(total - warmup, 1), max(warmup - 1, 1)
        cosine = end + 0.5 * (peak - end) * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
        if warmup <= 0:
            return cosine
        ramp = warmup_init + (peak - warmup_init) * t / ramp_len
        return jnp.where(t < warmup, ramp, cosine)

    return schedule


def cosine_between(start: float, end: float, total_steps: int) -> Schedule:
    """Cosine from ``start`` (step 0) to ``end`` (``total_steps``): DINO's weight-decay and momentum shape."""
    return warmup_cosine(start, total_steps, 0, end=end)


# ------------------------------------------------------------------------------------------------
# Masks.

def path_str(path) -> str:
    """``(DictKey('backbone'), DictKey('norm'), ...)`` -> ``"backbone/norm/..."``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def weight_decay_mask(params: PyTree, no_decay_keywords: Sequence[str] = (),
                      decay_keywords: Sequence[str] = ()) -> PyTree:
    """True where weight decay applies: ``ndim >= 2``, not a bias, no excluded keyword in the path.

    ``decay_keywords`` force decay whatever the rank: DINO's trainable ``weight_g`` is ``[out, 1]`` (2-D, so
    decayed) in PyTorch, while our ``scale_g`` is stored 1-D.
    """
    def decide(path, leaf):
        name = path_str(path)
        if any(k in name for k in decay_keywords):
            return True
        if leaf.ndim < 2 or name.endswith("bias"):
            return False
        return not any(k in name for k in no_decay_keywords)

    return jax.tree_util.tree_map_with_path(decide, params)


def path_mask(params: PyTree, patterns: Sequence[str]) -> PyTree:
    """True where the parameter path contains any of ``patterns`` (e.g. ``"last_layer"``)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: any(s in path_str(p) for s in patterns), params)


# ------------------------------------------------------------------------------------------------
# Custom transforms.

def clip_by_per_param_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale each gradient tensor to L2 norm <= ``max_norm`` independently (DINO/EsViT ``clip_gradients``).

    Not ``optax.clip_by_global_norm`` (one norm over all tensors) nor ``optax.clip_by_block_rms`` (RMS, not
    L2). Same formula as EsViT/DINO's: ``g * min(1, max_norm / (||g|| + 1e-6))``.
    """
    def update(updates, state, params=None):
        del params
        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class FreezeState(NamedTuple):
    count: jax.Array


def freeze_updates(mask: PyTree | Callable[[PyTree], PyTree], steps: int) -> optax.GradientTransformation:
    """Zero the updates of masked params while ``count < steps`` (put last in the chain: no step, no decay)."""
    def init(params):
        return FreezeState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        m = mask(updates) if callable(mask) else mask
        frozen = state.count < steps
        updates = jax.tree.map(lambda u, f: jnp.where(frozen & f, jnp.zeros_like(u), u), updates, m)
        return updates, FreezeState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


class PausedState(NamedTuple):
    count: jax.Array
    inner: Any


def paused_for(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """``inner`` that does nothing (zero updates, its state untouched) for the first ``steps`` updates, then runs
    as if those never happened -- PyTorch's view of a parameter whose gradient was None."""
    def init(params):
        return PausedState(count=jnp.zeros((), jnp.int32), inner=inner.init(params))

    def update(updates, state, params=None):
        new_updates, new_inner = inner.update(updates, state.inner, params)
        active = state.count >= steps
        new_updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_inner, state.inner)
        return new_updates, PausedState(count=optax.safe_increment(state.count), inner=new_inner)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------------
# The factory.

class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    lr: Schedule
    weight_decay: Schedule


def scaled_lr(optim: ml_collections.ConfigDict, global_batch: int, name: str = "base_lr") -> float:
    """``value * global_batch / lr_batch_base`` (MoBY: 1e-3 per 512; DINO: 5e-4 per 256)."""
    return float(optim[name]) * global_batch / float(optim.lr_batch_base)


def make_optimizer(optim: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int,
                   global_batch: int, freeze_steps: int = 0) -> Optimizer:
    """Builds the optax chain described in the module docstring from ``config.optim``.

    ``optim`` fields: ``base_lr, warmup_lr, min_lr`` (all scaled by ``global_batch / lr_batch_base``; ``min_lr``
    only with ``scale_min_lr`` -- MoBY/timm scale it, DINO's 1e-6 is absolute),
    ``lr_batch_base, cosine_from_start, b1, b2, eps, weight_decay, weight_decay_end`` (None: constant),
    ``clip_mode`` ("global" | "per_param" | "none"), ``clip_norm``, ``no_decay_keywords``, ``decay_keywords``,
    ``freeze_patterns`` (frozen for ``freeze_steps`` steps).
    """
    lr = warmup_cosine(scaled_lr(optim, global_batch), total_steps, warmup_steps,
                       warmup_init=scaled_lr(optim, global_batch, "warmup_lr"),
                       end=(scaled_lr(optim, global_batch, "min_lr") if optim.get("scale_min_lr", True)
                            else float(optim.min_lr)),
                       cosine_from_start=bool(optim.cosine_from_start))
    wd_end = optim.get("weight_decay_end")
    if wd_end is None:
        wd_value = float(optim.weight_decay)
        wd = lambda step: jnp.full((), wd_value, jnp.float32)
    else:
        wd = cosine_between(float(optim.weight_decay), float(wd_end), total_steps)

    parts = []
    if optim.clip_mode == "global":
        parts.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    elif optim.clip_mode == "per_param":
        parts.append(clip_by_per_param_norm(float(optim.clip_norm)))
    elif optim.clip_mode != "none":
        raise ValueError(f"config.optim.clip_mode must be 'global', 'per_param' or 'none', got {optim.clip_mode!r}")
    adam = lambda: optax.scale_by_adam(b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps))
    patterns = tuple(optim.get("freeze_patterns", ()) or ())
    freezing = freeze_steps > 0 and patterns
    if freezing:
        labels = lambda tree: jax.tree.map(lambda f: "frozen" if f else "trained", path_mask(tree, patterns))
        parts.append(optax.multi_transform({"trained": adam(), "frozen": paused_for(adam(), freeze_steps)}, labels))
    else:
        parts.append(adam())
    keywords = tuple(optim.get("no_decay_keywords", ()) or ())
    forced = tuple(optim.get("decay_keywords", ()) or ())
    parts.append(optax.add_decayed_weights(wd, mask=lambda p: weight_decay_mask(p, keywords, forced)))
    parts.append(optax.scale_by_learning_rate(lr))
    if freezing:
        parts.append(freeze_updates(lambda u: path_mask(u, patterns), freeze_steps))
    return Optimizer(tx=optax.chain(*parts), lr=lr, weight_decay=wd)

"""DINO (Caron et al. 2021) and EsViT (Li et al. 2022: DINO's view term + a region-matching term).

The objective, as the official ``facebookresearch/dino`` / ``microsoft/esvit`` code computes it (facts, not code):

* student = backbone + ``head`` (+ ``head_dense`` for EsViT's region term), both :class:`DINOHead`; the teacher
  has the same definitions, no drop path, and its parameters are an EMA of the student's, updated **after**
  the optimizer step with ``m = 1 - (1 - 0.996) (cos(pi k / K) + 1) / 2`` per step, heads included.
* the teacher sees only the 2 global crops, the student all ``V`` crops. For every pair
  (teacher crop ``iq`` in the globals, student crop ``v != iq``) -- ``n_pairs = 2 V - 2`` pairs:

  - view term: ``CE(softmax((t_iq - c) / tau_t), log_softmax(s_v / tau_s))``, mean over the batch;
  - region term (EsViT): for each token of student crop ``v``, the token of teacher crop ``iq`` with the highest
    cosine similarity of the *backbone* tokens (argmax, no gradient); cross-entropy between that
    teacher token's ``softmax((t_region - c_grid) / tau_t)`` and the student token's ``log_softmax(s / tau_s)``,
    mean over the student tokens of ``v``, mean over the batch.

  loss = mean over pairs of ``0.5 view + 0.5 region`` (EsViT) or of ``view`` (DINO).
* centers ``c`` (view) and ``c_grid`` (region): EMA(0.9) of the mean teacher head output over both global
  crops x the global batch, resp. over all teacher tokens; updated **after** the loss, which uses the previous
  value; init 0, kept in ``state.obj_state``.
* teacher temperature 0.04 -> 0.07: ``np.linspace`` over the warm-up epochs, then constant, indexed by the
  **epoch**: epoch ``e < W`` gets ``0.04 + 0.03 e / (W - 1)``, so epoch ``W - 1`` already has 0.07.
  Student temperature 0.1.
The optimizer side (AdamW lr/wd schedules, per-parameter clipping at 3.0, last layer frozen during the first
epoch) belongs to ``swin_ssl/train/optim.py``.

Memory: the region head sees ``B (2*49 + 8*9) = 170 B`` student tokens x 65536 logits per step.
:func:`region_loss_chunked` runs ``head_dense`` + log-softmax + cross-entropy over chunks of tokens in a
``lax.scan`` whose body is ``jax.checkpoint``-ed, so only one chunk's logits (forward and backward) are alive
at a time; the chunk size is ``config.dino.region_chunk_size`` (0 = one shot). Logits are fp32 (the heads
accumulate in fp32 even with bf16 matmuls), so the log-softmax is always fp32.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from swin_ssl import config_rules as rules
from swin_ssl.models import DTYPES, DINOHead, from_config
from swin_ssl.models.heads import l2_normalize
from swin_ssl.objectives import multicrop
from swin_ssl.train.state import (Objective, TrainState, copy_tree, cosine_momentum, ema_update,
                                  identity_update)

PyTree = Any


# ------------------------------------------------------------------------------------------------
# Schedules (pure functions of the step).

def teacher_temperature(step: jax.Array, steps_per_epoch: int, warmup_temp: float, temp: float,
                        warmup_epochs: int) -> jax.Array:
    """Teacher temperature of the epoch ``step // steps_per_epoch`` (official ``teacher_temp_schedule[epoch]``).

    The official schedule is ``np.linspace(warmup_temp, temp, warmup_epochs)`` followed by ``temp``: the
    last warm-up epoch already reaches ``temp``.
    """
    epoch = jnp.asarray(step, jnp.int32) // max(int(steps_per_epoch), 1)
    if warmup_epochs <= 0:
        return jnp.asarray(temp, jnp.float32)
    frac = jnp.minimum(epoch.astype(jnp.float32) / max(warmup_epochs - 1, 1), 1.0)
    warm = warmup_temp + (temp - warmup_temp) * frac
    return jnp.where(epoch < warmup_epochs, warm, temp).astype(jnp.float32)


def teacher_momentum(step: jax.Array, total_steps: int, base: float = 0.996) -> jax.Array:
    """``1 - (1 - base) (cos(pi step / total) + 1) / 2`` (official ``cosine_scheduler(base, 1, ...)[step]``)."""
    return cosine_momentum(step, total_steps, base)


# ------------------------------------------------------------------------------------------------
# Centers.

def update_center(center: jax.Array, batch_mean: jax.Array, momentum: float = 0.9) -> jax.Array:
    """``c <- m c + (1 - m) mean``; ``batch_mean`` must already be the *global* mean (pmean under pmap)."""
    return center * momentum + batch_mean.astype(center.dtype) * (1.0 - momentum)


def teacher_probs(logits: jax.Array, center: jax.Array, temp: jax.Array) -> jax.Array:
    """Centred, sharpened teacher distribution ``softmax((t - c) / tau_t)`` in fp32, without gradient."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    return jax.nn.softmax((logits - center) / temp, axis=-1)


def entropy(p: jax.Array, axis: int = -1) -> jax.Array:
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


# ------------------------------------------------------------------------------------------------
# View term (DINO's loss).

def num_pairs(num_crops: int, num_global: int) -> int:
    """Pairs (teacher crop iq < num_global, student crop v != iq)."""
    return num_global * num_crops - num_global


def view_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array, teacher_temp: jax.Array,
              student_temp: float = 0.1) -> tuple[jax.Array, dict]:
    """DINO's cross-entropy over all (iq, v != iq) pairs, each a mean over the batch, averaged over pairs.

    Args:
      student_logits: ``[V, B, K]`` student head outputs, crop-major (globals first).
      teacher_logits: ``[G, B, K]`` teacher head outputs of the global crops.
      center: ``[K]`` the current (previous-step) center.
    Returns: the loss and ``{"teacher_entropy", "kl"}`` (``kl`` = mean over the pairs of KL(teacher || student)).
    """
    num_crops, num_global = student_logits.shape[0], teacher_logits.shape[0]
    t = teacher_probs(teacher_logits, center, teacher_temp)  # [G, B, K]
    logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)  # [V, B, K]
    ce = -jnp.einsum("gbk,vbk->gv", t, logp) / student_logits.shape[1]  # [G, V] batch means
    keep = jnp.asarray(np.arange(num_global)[:, None] != np.arange(num_crops)[None, :], jnp.float32)
    n = num_pairs(num_crops, num_global)
    loss = jnp.sum(ce * keep) / n
    h_t = entropy(t).mean(axis=1)  # [G]
    kl = jnp.sum((ce - h_t[:, None]) * keep) / n
    return loss, {"teacher_entropy": h_t.mean(), "kl": kl}


# ------------------------------------------------------------------------------------------------
# Region term (EsViT).

def match_regions(student_tokens: jax.Array, teacher_tokens: jax.Array, num_global: int) -> jax.Array:
    """For every student token and teacher crop ``iq``, the most cosine-similar token of that teacher crop.

    Args:
      student_tokens: ``[B, T, D]`` backbone tokens of all student crops (per image, crop-major).
      teacher_tokens: ``[B, G * Nt, D]`` backbone tokens of the global crops (crop ``iq`` at ``iq*Nt:(iq+1)*Nt``).
    Returns: int32 ``[B, T, G]`` indices into the ``G * Nt`` teacher tokens (no gradient).
    """
    s = l2_normalize(jax.lax.stop_gradient(student_tokens).astype(jnp.float32))
    t = l2_normalize(jax.lax.stop_gradient(teacher_tokens).astype(jnp.float32))
    b, tt, d = t.shape
    nt = tt // num_global
    sim = jnp.einsum("bsd,bgtd->bsgt", s, t.reshape(b, num_global, nt, d))  # [B, T, G, Nt]
    return (jnp.argmax(sim, axis=-1) + np.arange(num_global) * nt).astype(jnp.int32)


def region_pair_weights(tokens_per_crop: Sequence[int], num_global: int) -> np.ndarray:
    """``[T, G]`` weight of (student token t, teacher crop iq): 0 when t belongs to crop iq, else
    ``1 / (N_v n_pairs)`` -- so that the weighted sum is the mean over pairs of the mean over tokens."""
    crop = multicrop.token_crop_ids(tokens_per_crop)
    counts = np.asarray(tokens_per_crop, np.float64)[crop]
    n = num_pairs(len(tokens_per_crop), num_global)
    keep = crop[:, None] != np.arange(num_global)[None, :]
    return (keep / (counts[:, None] * n)).astype(np.float32)


def _gather_targets(probs: jax.Array, idx: jax.Array) -> jax.Array:
    """``probs [B, Tt, K]``, ``idx [B, c, G]`` -> ``[B, c, G, K]`` (a batched row gather)."""
    return jax.vmap(lambda p, i: p[i])(probs, idx)


def _region_ce_sum(student_logits: jax.Array, probs: jax.Array, idx: jax.Array, weights: jax.Array,
                   student_temp: float) -> jax.Array:
    """``sum_{b,t,iq} w[t,iq] CE(target[b, idx[b,t,iq]], student[b,t])`` for one chunk of tokens."""
    logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)  # [B, c, K]
    targets = _gather_targets(probs, idx)  # [B, c, G, K]
    ce = -jnp.einsum("bcgk,bck->bcg", targets, logp)
    return jnp.sum(ce * weights[None])


def region_loss(student_logits: jax.Array, probs: jax.Array, idx: jax.Array, weights: jax.Array,
                student_temp: float = 0.1) -> jax.Array:
    """EsViT's region term, mean over pairs of (mean over the batch of the mean over student tokens).

    Args:
      student_logits: ``[B, T, K]`` ``head_dense`` outputs of all student tokens.
      probs: ``[B, G * Nt, K]`` teacher region distributions (:func:`teacher_probs` with ``c_grid``).
      idx: ``[B, T, G]`` from :func:`match_regions`; weights: ``[T, G]`` from :func:`region_pair_weights`.
    """
    return _region_ce_sum(student_logits, probs, idx, jnp.asarray(weights), student_temp) / student_logits.shape[0]


def region_loss_chunked(head_fn: Callable[[jax.Array], jax.Array], student_tokens: jax.Array, probs: jax.Array,
                        idx: jax.Array, weights: np.ndarray, student_temp: float = 0.1,
                        chunk_size: int = 0) -> jax.Array:
    """:func:`region_loss` of ``head_fn(student_tokens)`` without materialising all ``[B, T, K]`` logits.

    The student tokens are cut into chunks of ``chunk_size`` tokens (per image; the last chunk padded with
    zero-weight copies of the last token); a ``lax.scan`` over the chunks runs head + log-softmax + CE under ``jax.checkpoint``,
    so the backward pass recomputes each chunk's logits instead of storing them. ``chunk_size <= 0`` or
    ``>= T``: one shot (the reference the benchmark compares against).
    """
    b, t, d = student_tokens.shape
    weights = jnp.asarray(weights)
    if chunk_size <= 0 or chunk_size >= t:
        return region_loss(head_fn(student_tokens), probs, idx, weights, student_temp)
    n_chunks = -(-t // chunk_size)
    pad = n_chunks * chunk_size - t
    if pad:  # repeat the last token (a zero token would give NaN gradients through the head's L2 normalisation)
        student_tokens = jnp.pad(student_tokens, ((0, 0), (0, pad), (0, 0)), mode="edge")
        idx = jnp.pad(idx, ((0, 0), (0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    g = idx.shape[-1]
    xs = (jnp.moveaxis(student_tokens.reshape(b, n_chunks, chunk_size, d), 1, 0),
          jnp.moveaxis(idx.reshape(b, n_chunks, chunk_size, g), 1, 0),
          weights.reshape(n_chunks, chunk_size, g))

    @jax.checkpoint
    def chunk_loss(tok, ix, w):
        return _region_ce_sum(head_fn(tok), probs, ix, w, student_temp)

    def body(total, chunk):
        return total + chunk_loss(*chunk), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total / b


def matched_entropy(probs: jax.Array, idx: jax.Array, weights: np.ndarray) -> jax.Array:
    """Entropy of the matched teacher targets, weighted like the region loss (region KL = loss - this)."""
    h = entropy(probs)  # [B, Tt]
    matched = jax.vmap(lambda hb, ib: hb[ib])(h, idx)  # [B, T, G]
    return jnp.sum(matched * jnp.asarray(weights)[None]) / idx.shape[0]


# ------------------------------------------------------------------------------------------------
# The objective.

# ``config.dino``: the EsViT / DINO recipe (``main_esvit.py`` / ``main_dino.py`` defaults); the trainer's known keys.
DEFAULTS = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3, norm_last_layer=False, region=True,
                view_weight=0.5, region_weight=0.5, teacher_temp=0.07, warmup_teacher_temp=0.04,
                warmup_teacher_temp_epochs=30, student_temp=0.1, center_momentum=0.9, momentum=0.996,
                region_chunk_size=17)  # 170 student tokens per image (2x49 + 8x9) -> 10 chunks


def check(config: ml_collections.ConfigDict, durations) -> None:
    """The rules of ``config.dino`` (one-line ``ValueError`` naming the key); ``durations`` bounds the warm-up."""
    d = config.dino
    for key in ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers"):
        rules.positive(f"dino.{key}", d[key])
    for key in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
        rules.positive(f"dino.{key}", d[key])
    for key in ("momentum", "center_momentum", "view_weight", "region_weight"):
        rules.unit_interval(f"dino.{key}", d[key])
    if int(d.region_chunk_size) < 0:
        rules.fail("dino.region_chunk_size", d.region_chunk_size, "must be >= 0 (0: all tokens at once)")
    epochs, per_epoch, total = int(d.warmup_teacher_temp_epochs), durations.steps_per_epoch, durations.total_steps
    if epochs < 0 or epochs * per_epoch > total:
        rules.fail("dino.warmup_teacher_temp_epochs", epochs, f"the teacher-temperature warm-up ({epochs} epochs of "
                   f"{per_epoch} steps) must not be longer than the run ({total} steps)")


def build_networks(config: ml_collections.ConfigDict):
    """Student backbone (drop path), teacher backbone (no drop path) and the DINO head definition.

    ``head`` and ``head_dense`` (EsViT's region head) are the same module definition with separate parameters.
    """
    m, d = config.model, config.dino
    size, dtype, remat = int(config.data.image_size), DTYPES[m.dtype], bool(m.get("remat", False))
    student = from_config(m, size, dtype=dtype, remat=remat, drop_path_rate=float(m.drop_path_rate))
    teacher = from_config(m, size, dtype=dtype, remat=remat, drop_path_rate=float(m.target_drop_path_rate))
    head = DINOHead(out_dim=int(d.out_dim), hidden_dim=int(d.hidden_dim), bottleneck_dim=int(d.bottleneck_dim),
                    num_layers=int(d.num_layers), norm_last_layer=bool(d.norm_last_layer), dtype=dtype)
    return student, teacher, head


def make_objective(config: ml_collections.ConfigDict, *, durations, axis_name: str | None = None) -> Objective:
    """DINO (``config.dino.region=False``) or EsViT (``True``) as an :class:`Objective`.

    ``durations``: ``swin_ssl.train.validate.Durations`` -- the teacher EMA spans ``total_steps``, the teacher
    temperature is indexed by ``step // steps_per_epoch``. ``axis_name``: the pmap axis (None under jit, where
    the batch is global).
    """
    student_net, teacher_net, head = build_networks(config)
    d = config.dino
    dense = bool(d.region)
    total_steps, spe = int(durations.total_steps), int(durations.steps_per_epoch)
    student_temp, center_m = float(d.student_temp), float(d.center_momentum)
    view_w, region_w = (float(d.view_weight), float(d.region_weight)) if dense else (1.0, 0.0)
    chunk = int(d.region_chunk_size)
    drop_path = float(config.model.drop_path_rate) > 0
    size = int(config.data.image_size)

    def temperature(step):
        return teacher_temperature(step, spe, float(d.warmup_teacher_temp), float(d.teacher_temp),
                                   int(d.warmup_teacher_temp_epochs))

    def momentum(step):
        return teacher_momentum(step, total_steps, float(d.momentum))

    def schedules(step):
        return {"momentum": momentum(step), "teacher_temp": temperature(step)}

    def init(rng):
        r_backbone, r_head, r_dense = jax.random.split(rng, 3)
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        backbone_vars = student_net.init({"params": r_backbone}, images, train=False)
        pooled, _ = student_net.apply(backbone_vars, images, train=False)
        params = {"backbone": backbone_vars["params"], "head": head.init({"params": r_head}, pooled)["params"]}
        obj_state = {"center": jnp.zeros((int(d.out_dim),), jnp.float32)}
        if dense:
            params["head_dense"] = head.init({"params": r_dense}, pooled)["params"]
            obj_state["center_grid"] = jnp.zeros((int(d.out_dim),), jnp.float32)
        return {
            "params": params,
            # The official teacher starts as a copy of the student (heads included).
            "target_params": copy_tree(params),
            "batch_stats": {"online": {}, "target": {}},
            "obj_state": obj_state,
        }

    def global_mean(x):
        return x if axis_name is None else jax.lax.pmean(x, axis_name)

    def loss(params, state: TrainState, batch, rng):
        names = multicrop.crop_names(batch)
        crops = [batch[n] for n in names]
        num_global = multicrop.num_global_crops(names)
        student_apply = lambda x, r: student_net.apply(
            {"params": params["backbone"]}, x, train=True, rngs=None if r is None else {"dropout": r})
        s_pooled, s_tokens, counts = multicrop.multicrop_forward(
            student_apply, crops, rng if drop_path else None, with_tokens=dense)
        tp = state.target_params
        teacher_apply = lambda x, r: teacher_net.apply({"params": tp["backbone"]}, x, train=False)
        t_pooled, t_tokens, _ = multicrop.multicrop_forward(teacher_apply, crops[:num_global], None, with_tokens=dense)
        t_pooled, t_tokens = jax.lax.stop_gradient((t_pooled, t_tokens))

        temp = temperature(state.step)
        obj = state.obj_state
        s_out = head.apply({"params": params["head"]}, s_pooled)  # [V, B, K]
        t_out = jax.lax.stop_gradient(head.apply({"params": tp["head"]}, t_pooled))  # [G, B, K]
        view, view_metrics = view_loss(s_out, t_out, obj["center"], temp, student_temp)
        new_obj = {"center": update_center(obj["center"], global_mean(t_out.mean(axis=(0, 1))), center_m)}
        # Health signals (teacher_temp and momentum come from ``schedules``); center norms are those used here.
        metrics = {"view_loss": view, "teacher_entropy": view_metrics["teacher_entropy"], "kl": view_metrics["kl"],
                   "center_norm": jnp.linalg.norm(obj["center"])}
        total = view_w * view
        if dense:
            t_region = jax.lax.stop_gradient(head.apply({"params": tp["head_dense"]}, t_tokens))  # [B, G*Nt, K]
            probs = teacher_probs(t_region, obj["center_grid"], temp)
            idx = match_regions(s_tokens, t_tokens, num_global)
            weights = region_pair_weights(counts, num_global)
            region = region_loss_chunked(lambda x: head.apply({"params": params["head_dense"]}, x), s_tokens,
                                         probs, idx, weights, student_temp, chunk)
            total = total + region_w * region
            new_obj["center_grid"] = update_center(obj["center_grid"],
                                                   global_mean(t_region.mean(axis=(0, 1))), center_m)
            h_region = matched_entropy(probs, idx, weights)
            metrics.update(region_loss=region, region_teacher_entropy=entropy(probs).mean(),
                           region_kl=region - h_region, center_grid_norm=jnp.linalg.norm(obj["center_grid"]))
        aux = {"batch_stats": state.batch_stats, "obj_state": new_obj, "metrics": metrics}
        return total, aux

    def after_step(state: TrainState) -> TrainState:
        # The step calls this after the optimizer update, with ``state.step`` still the update's index.
        return state.replace(target_params=ema_update(state.target_params, state.params, momentum(state.step)))

    return Objective(
        name="esvit" if dense else "dino", init=init, loss=loss, before_step=identity_update,
        after_step=after_step, schedules=schedules,
        # EsViT/DINO evaluate the teacher (k-NN and linear); docs/fidelity.md
        eval_backbone="target",
    )

"""MoBY (Xie et al. 2021): MoCo v2 queues + BYOL predictor/EMA, as pure functions on the train state.

The objective, as the official ``Transformer-SSL/models/moby.py`` computes it (facts, not its code):

* online: ``encoder -> projector -> predictor`` (Swin/DeiT, drop path 0.2); target: ``encoder -> projector``
  (same definitions, drop path 0.0) whose *parameters* are an EMA of the online ones. Projector and predictor
  are :class:`~swin_ssl.models.heads.MoBYMLP` (in -> 4096 -> BN -> ReLU -> 256), with BatchNorm in batch-stats
  mode in *both* branches and statistics over the global batch of *one view* (the official code calls the
  network once per view). Target BN statistics come from the target's own forward; running
  statistics are never EMA'd.
* EMA **before** the key pass, so the keys use the pre-step online weights mixed in, over encoder+projector
  parameters only; momentum ``m = 1 - (1 - 0.99) * (cos(pi k / K) + 1) / 2`` with ``k`` the train step and ``K``
  the total number of steps. (The official code keeps ``k`` in a Python attribute set at construction, so a
  resumed run restarts at 0.99); here ``k`` is ``state.step``, so it continues.)
* loss = CE(q1 vs [k2, queue2]) + CE(q2 vs [k1, queue1]) at temperature 0.2, a **sum** of the two means;
  ``queue1`` holds target keys of view 1 and serves as negatives for view 2's prediction.
* after the loss, the keys of the global batch are enqueued at ``ptr`` (``K % global_batch == 0``).

Layout choices of this port:
* queues are stored row-major ``[K, dim]`` (PyTorch: ``[dim, K]``), initialised as L2-normalised Gaussians;
* both views go through each backbone in ONE call on the interleaved batch ``[b0v1, b0v2, b1v1, ...]`` (the
  backbones are per-sample networks -- LayerNorm only -- so this is the same math as two calls, traced once);
  the heads are called once per view, so BatchNorm normalises each view over its own global batch.
  Interleaving (stack on axis 1, merge with the batch axis) keeps every example on the device that holds it
  under a batch-sharded jit. (Stacking views on a leading axis and ``vmap``-ing instead made XLA all-gather
  the images and compute the whole batch on every device: 8x the work on 8 devices, with identical numbers.)
* the BN running averages, which PyTorch updates twice per step (view 1 then view 2), are set to the mean of
  the two per-view updates (``m r + (1-m) (s1 + s2) / 2`` instead of ``m^2 r + m(1-m) s1 + (1-m) s2``). They
  only matter for eval-mode use of the heads, which neither training nor the evaluators do.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from swin_ssl import config_rules as rules
from swin_ssl.models import DTYPES, MoBYMLP, from_config
from swin_ssl.models.heads import l2_normalize
from swin_ssl.train.state import (Objective, TrainState, copy_tree, cosine_momentum, ema_update,
                                  identity_update)

PyTree = Any
VIEWS = ("view1", "view2")


# ------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested against NumPy re-derivations).

def momentum_schedule(step: jax.Array, total_steps: int, base: float = 0.99) -> jax.Array:
    """``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``: ``base`` at step 0, 1.0 at ``total_steps``."""
    return cosine_momentum(step, total_steps, base)


def init_queues(rng: jax.Array, size: int, dim: int) -> dict:
    """Two queues of ``size`` random unit vectors (rows) and the write pointer."""
    r1, r2 = jax.random.split(rng)
    return {
        "queue1": l2_normalize(jax.random.normal(r1, (size, dim), jnp.float32)),
        "queue2": l2_normalize(jax.random.normal(r2, (size, dim), jnp.float32)),
        "ptr": jnp.zeros((), jnp.int32),
    }


def enqueue(queues: dict, keys1: jax.Array, keys2: jax.Array) -> dict:
    """Write the global batch of keys at ``ptr`` (queue1 <- view-1 keys, queue2 <- view-2 keys), advance ``ptr``.

    ``K % batch == 0`` (checked by the config validation) makes every write contiguous, as in the official code.
    """
    ptr = queues["ptr"]
    size, batch = queues["queue1"].shape[0], keys1.shape[0]
    write = lambda q, k: jax.lax.dynamic_update_slice(q, k.astype(q.dtype), (ptr, jnp.zeros_like(ptr)))
    return {
        "queue1": write(queues["queue1"], keys1),
        "queue2": write(queues["queue2"], keys2),
        "ptr": (ptr + batch) % size,
    }


def contrastive_terms(pred: jax.Array, key: jax.Array, queue: jax.Array, temperature: float):
    """InfoNCE of each prediction against its positive key and the queue; all vectors unit-norm.

    Returns per-sample losses [B], positive logits [B] and negative logits [B, K] (both divided by T).
    """
    pos = jnp.sum(pred * key, axis=-1) / temperature
    neg = pred @ queue.T / temperature
    logits = jnp.concatenate([pos[:, None], neg], axis=1)
    return jax.nn.logsumexp(logits, axis=1) - pos, pos, neg


def moby_loss(pred1, pred2, key1, key2, queue1, queue2, temperature: float):
    """Sum of the two symmetric InfoNCE terms, each a mean over the (local) batch, plus health metrics."""
    l12, pos12, neg12 = contrastive_terms(pred1, key2, queue2, temperature)
    l21, pos21, neg21 = contrastive_terms(pred2, key1, queue1, temperature)
    loss = l12.mean() + l21.mean()
    metrics = {
        "pos_logit": (pos12.mean() + pos21.mean()) / 2,
        "neg_logit": (neg12.mean() + neg21.mean()) / 2,
    }
    return loss, metrics


def key_std(keys: jax.Array) -> jax.Array:
    """Per-dimension std of unit keys over the batch, averaged: ~1/sqrt(dim) when spread, -> 0 on collapse."""
    return jnp.std(keys, axis=0).mean()


def _merge_running_stats(per_view: list) -> PyTree:
    """Per-view BN running-stat updates -> one update (their mean; see the module docstring)."""
    return jax.tree.map(lambda *xs: sum(xs) / len(xs), *per_view)


# ------------------------------------------------------------------------------------------------
# The objective.

# ``config.moby``: the official recipe (Transformer-SSL ``configs/moby_*.yaml``); the trainer's known keys.
DEFAULTS = dict(queue_size=4096, temperature=0.2, momentum=0.99, proj_dim=256, proj_hidden_dim=4096,
                pred_hidden_dim=4096, proj_layers=2, pred_layers=2)


def check(config: ml_collections.ConfigDict, durations) -> None:
    """The rules of ``config.moby`` (one-line ``ValueError`` naming the key)."""
    del durations  # MoBY's schedules need no bound beyond the run's
    mb, batch = config.moby, int(config.batch_size)
    queue = int(mb.queue_size)
    if queue <= 0 or queue % batch:
        rules.fail("moby.queue_size", queue, f"must be a positive multiple of the global batch_size ({batch})")
    rules.positive("moby.temperature", mb.temperature)
    rules.unit_interval("moby.momentum", mb.momentum)
    for key in ("proj_dim", "proj_hidden_dim", "pred_hidden_dim", "proj_layers", "pred_layers"):
        rules.positive(f"moby.{key}", mb[key])


def build_networks(config: ml_collections.ConfigDict, axis_name: str | None = None):
    """Online encoder, target encoder (no drop path), projector and predictor modules from the config."""
    m, mb = config.model, config.moby
    size, dtype, remat = int(config.data.image_size), DTYPES[m.dtype], bool(m.get("remat", False))
    online = from_config(m, size, dtype=dtype, remat=remat, drop_path_rate=float(m.drop_path_rate))
    target = from_config(m, size, dtype=dtype, remat=remat, drop_path_rate=float(m.target_drop_path_rate))
    heads = dict(axis_name=axis_name, dtype=dtype)
    projector = MoBYMLP(hidden_dim=mb.proj_hidden_dim, out_dim=mb.proj_dim, num_layers=mb.proj_layers, **heads)
    predictor = MoBYMLP(hidden_dim=mb.pred_hidden_dim, out_dim=mb.proj_dim, num_layers=mb.pred_layers, **heads)
    return online, target, projector, predictor


def make_objective(config: ml_collections.ConfigDict, *, durations, axis_name: str | None = None) -> Objective:
    """MoBY as an :class:`Objective`.

    ``durations``: ``swin_ssl.train.validate.Durations`` (the momentum schedule spans ``total_steps``);
    ``axis_name``: the pmap axis (None under jit, where the batch is global).
    """
    total_steps = int(durations.total_steps)
    online_net, target_net, projector, predictor = build_networks(config, axis_name)
    mb = config.moby
    temperature, base_momentum = float(mb.temperature), float(mb.momentum)
    size = int(config.data.image_size)
    drop_path = float(config.model.drop_path_rate) > 0

    def schedules(step):
        return {"momentum": momentum_schedule(step, total_steps, base_momentum)}

    def init(rng):
        r_enc, r_proj, r_pred, r_queue = jax.random.split(rng, 4)
        images = jnp.zeros((2, size, size, 3), jnp.float32)
        enc_vars = online_net.init({"params": r_enc}, images, train=False)
        proj_vars = projector.init({"params": r_proj}, jnp.zeros((2, online_net.num_features)), train=False)
        pred_vars = predictor.init({"params": r_pred}, jnp.zeros((2, int(mb.proj_dim))), train=False)
        params = {"backbone": enc_vars["params"], "projector": proj_vars["params"], "predictor": pred_vars["params"]}
        online_stats = {"projector": proj_vars["batch_stats"], "predictor": pred_vars["batch_stats"]}
        return {
            "params": params,
            # The official model copies the online weights into the target at construction.
            "target_params": copy_tree({"backbone": params["backbone"], "projector": params["projector"]}),
            "batch_stats": {"online": online_stats, "target": copy_tree({"projector": online_stats["projector"]})},
            "obj_state": init_queues(r_queue, int(mb.queue_size), int(mb.proj_dim)),
        }

    def before_step(state: TrainState) -> TrainState:
        m = momentum_schedule(state.step, total_steps, base_momentum)
        online = {"backbone": state.params["backbone"], "projector": state.params["projector"]}
        return state.replace(target_params=ema_update(state.target_params, online, m))

    def interleave(batch):
        """[B, ...] x 2 views -> [2B, ...] ordered (b0 v1, b0 v2, b1 v1, ...): merging the sharded batch axis
        with the (unsharded, minor) view axis keeps every example on its device; no collective."""
        return jnp.stack([batch[v] for v in VIEWS], axis=1).reshape((-1,) + batch[VIEWS[0]].shape[1:])

    def split_views(x):
        x = x.reshape((-1, len(VIEWS)) + x.shape[1:])
        return [x[:, i] for i in range(len(VIEWS))]

    def head(module, params, stats, x):
        out, upd = module.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return out, upd["batch_stats"]

    def loss(params, state: TrainState, batch, rng):
        images = interleave(batch)
        # Backbones: one pass over both views (per-sample networks). Heads: one call per view, so BatchNorm
        # normalises each view over its own (global) batch, as the official two forward calls do.
        feats, _ = online_net.apply({"params": params["backbone"]}, images, train=True,
                                    rngs={"dropout": rng} if drop_path else None)
        target_feats, _ = target_net.apply({"params": state.target_params["backbone"]}, images, train=True)
        on_stats, tg_stats = state.batch_stats["online"], state.batch_stats["target"]
        preds, keys, stats = [], [], {"proj": [], "pred": [], "target": []}
        for f, tf in zip(split_views(feats), split_views(target_feats)):
            z, s_z = head(projector, params["projector"], on_stats["projector"], f)
            q, s_q = head(predictor, params["predictor"], on_stats["predictor"], z)
            k, s_k = head(projector, state.target_params["projector"], tg_stats["projector"], tf)
            preds.append(l2_normalize(q.astype(jnp.float32)))
            keys.append(jax.lax.stop_gradient(l2_normalize(k.astype(jnp.float32))))
            stats["proj"].append(s_z)
            stats["pred"].append(s_q)
            stats["target"].append(s_k)
        queues = state.obj_state
        value, metrics = moby_loss(preds[0], preds[1], keys[0], keys[1], queues["queue1"], queues["queue2"],
                                   temperature)
        if axis_name is not None:  # every device enqueues the same global batch of keys (official all_gather)
            keys = [jax.lax.all_gather(k, axis_name, axis=0, tiled=True) for k in keys]
        metrics["key_std"] = (key_std(keys[0]) + key_std(keys[1])) / 2
        aux = {
            "batch_stats": {"online": {"projector": _merge_running_stats(stats["proj"]),
                                       "predictor": _merge_running_stats(stats["pred"])},
                            "target": {"projector": _merge_running_stats(stats["target"])}},
            "obj_state": enqueue(queues, keys[0], keys[1]),
            "metrics": metrics,
        }
        return value, aux

    return Objective(
        name="moby", init=init, loss=loss, before_step=before_step, after_step=identity_update,
        schedules=schedules,
        # MoBY's linear protocol and downstream code use the online encoder (``encoder.*``); docs/fidelity.md
        eval_backbone="online",
    )

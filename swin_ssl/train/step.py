"""The generic train step: one pure function of (state, batch) for any :class:`Objective`.

The same function runs under ``jax.jit`` with a batch sharded over the mesh (``axis_name=None``: every
reduction is global, XLA inserts the collectives) and under ``jax.pmap`` (``axis_name`` set: the loss is a
local mean, gradients/loss/metrics are ``pmean``-ed here and the objective does its own collectives).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from swin_ssl.train.optim import Optimizer
from swin_ssl.train.state import Objective, TrainState

PyTree = Any


def step_rng(state: TrainState, axis_name: str | None) -> jax.Array:
    """Per-step key ``fold_in(rng, step)``; under pmap also folded with the device index (own drop-path masks)."""
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return rng


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite (one boolean)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def loss_and_grads(state: TrainState, batch, *, objective: Objective, axis_name: str | None = None):
    """``before_step`` then the loss and its gradients w.r.t. ``state.params`` (averaged over devices).

    Returns ``(state after before_step, loss, aux, grads)``; exposed so tests can compare gradients across
    parallel paths (post-Adam parameters amplify rounding noise, gradients do not).
    """
    state = objective.before_step(state)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, state, batch, step_rng(state, axis_name))
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
        aux = dict(aux, metrics=jax.lax.pmean(aux["metrics"], axis_name))
    return state, loss, aux, grads


def train_step(state: TrainState, batch, *, objective: Objective, optimizer: Optimizer,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimizer update. Returns the new state and scalar metrics (loss, schedules, norms, objective's)."""
    old_state = state
    state, loss, aux, grads = loss_and_grads(state, batch, objective=objective, axis_name=axis_name)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "lr": optimizer.lr(state.step),
        "weight_decay": optimizer.weight_decay(state.step),
        "grad_norm": optax.tree.norm(grads),  # before clipping
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        **objective.schedules(state.step),
        **aux["metrics"],
    }
    new_state = state.replace(params=params, opt_state=opt_state, batch_stats=aux["batch_stats"],
                              obj_state=aux["obj_state"])
    # after_step sees the updated params while ``state.step`` is still this update's index (DINO: m[it]).
    new_state = objective.after_step(new_state)
    # A non-finite loss or gradient, or an update that made any value of the new state non-finite (an lr, weight
    # decay or eps that breaks the update), leaves everything (params, optimizer, EMA target, queues/centers, BN
    # stats) as it was before this step; only the step counter moves on, so the data order and schedules stay
    # aligned. The loop decides whether to stop or go on (config.on_nonfinite); either way nothing broken is kept.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & all_finite(new_state)
    # Through a (scalar) cond, XLA cannot copy the AND over every leaf into each select below: without it the
    # program grows with the square of the number of leaves (a 4x compile time, 8x cache-load time on CPU).
    finite = jax.lax.cond(finite, lambda: True, lambda: False)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    new_state = new_state.replace(step=old_state.step + 1)
    metrics["finite"] = finite
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

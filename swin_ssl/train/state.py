"""The train state (everything a resumed run needs, in one pytree) and the small protocol an SSL objective implements.

Everything a step reads or writes lives in one pytree, :class:`TrainState`, so that a step is a pure
function ``(state, batch) -> (state, metrics)``, the whole state can be donated, sharded, checkpointed
and restored as one object, and every schedule can be recomputed from ``state.step`` after a resume.

An objective (MoBY, DINO/EsViT, ...) is not a class hierarchy but a bundle of pure functions
(:class:`Objective`). The generic step in ``swin_ssl/train/step.py`` does, in this order::

    state = objective.before_step(state)            # MoBY: EMA of the target (pre-step online weights)
    (loss, aux), grads = value_and_grad(objective.loss)(state.params, state, batch, rng)
    grads = pmean(grads)                             # pmap only; under jit the batch is already global
    params, opt_state = optimizer(grads, ...)
    state = state.replace(params, opt_state, batch_stats=aux["batch_stats"], obj_state=aux["obj_state"])
    state = objective.after_step(state)             # EsViT/DINO: EMA of the teacher after the update
    state = state.replace(step=state.step + 1)

so MoBY's "EMA before the key pass" and EsViT's "EMA after the optimizer step" are both expressed
without the step knowing which objective runs.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any
Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """One pytree with all training state (checkpointed as a whole by ``swin_ssl/checkpoint.py``).

    Attributes:
      step: int32 scalar, number of optimizer updates done so far. All schedules are functions of it.
      params: online (student) parameters, ``{"backbone", <heads>...}`` -- the only thing with gradients.
      opt_state: optax state of ``params``.
      target_params: EMA target/teacher parameters (MoBY: ``{"backbone", "projector"}``; DINO: backbone + heads).
        Always separate buffers from ``params`` (donation fails on aliases).
      batch_stats: BatchNorm statistics ``{"online": ..., "target": ...}`` (empty dicts when a net has no BN).
      obj_state: the objective's own state (MoBY: queues and pointer; DINO: centers).
      rng: a raw uint32 PRNG key that never changes; the per-step key is ``fold_in(rng, step)``, so a
        resumed run draws the same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    target_params: PyTree
    batch_stats: PyTree
    obj_state: PyTree
    rng: jax.Array


class Objective(NamedTuple):
    """An SSL objective as pure functions (built by ``swin_ssl.objectives.<name>.make_objective``).

    Fields:
      name: e.g. "moby", "esvit".
      init: ``init(rng) -> dict(params=..., target_params=..., batch_stats=..., obj_state=...)``. Shapes
        come from the config the objective was built with; target buffers must be copies.
      loss: ``loss(params, state, batch, rng) -> (scalar loss, aux)`` with ``aux = {"batch_stats": new BN
        stats (online and target), "obj_state": new objective state, "metrics": {name: scalar}}``. Under pmap
        (objective built with ``axis_name``) the loss is the local-batch mean and the objective does its own
        collectives for statistics it keeps (BatchNorm, queue enqueue, centers).
      before_step: ``state -> state`` applied before the loss (MoBY's EMA).
      after_step: ``state -> state`` applied after the optimizer update (EsViT/DINO's EMA); it sees the new
        params while ``state.step`` is still the index of the update just made (so ``m = schedule(state.step)``).
      schedules: ``step -> {name: scalar}`` for the objective's own schedules (momentum, teacher temperature),
        used by the step for logging; must be pure functions of the step.
      eval_backbone: which backbone downstream evaluation uses by default, "online" (``params["backbone"]``;
        MoBY, as the official linear eval) or "target" (``target_params["backbone"]``; DINO/EsViT teacher).
    """

    name: str
    init: Callable[[jax.Array], dict]
    loss: Callable[..., tuple[jax.Array, dict]]
    before_step: Callable[[TrainState], TrainState]
    after_step: Callable[[TrainState], TrainState]
    schedules: Callable[[jax.Array], dict]
    eval_backbone: str


def identity_update(state: TrainState) -> TrainState:
    return state


def copy_tree(tree: PyTree) -> PyTree:
    """Fresh buffers for every leaf: the target starts equal to, but never aliased with, the online net."""
    return jax.tree.map(jnp.copy, tree)


def cosine_momentum(step: jax.Array, total_steps: int, base: float) -> jax.Array:
    """EMA momentum ``1 - (1 - base)(cos(pi step / total) + 1) / 2``: ``base`` at step 0, 1 from ``total_steps`` on
    (MoBY's and DINO's schedule; ``optax.cosine_decay_schedule`` of ``1 - base``)."""
    return 1.0 - optax.cosine_decay_schedule(1.0 - base, max(int(total_steps), 1))(step)


def ema_update(target: PyTree, online: PyTree, momentum: jax.Array) -> PyTree:
    """``target <- m * target + (1 - m) * online`` leaf by leaf: the PyTorch in-place EMA's arithmetic
    (``optax.incremental_update`` weighs the target by ``1 - (1 - m)``, not bitwise ``m``)."""
    return jax.tree.map(lambda t, o: t * momentum + o * (1.0 - momentum), target, online)


def create_train_state(objective: Objective, optimizer, rng: jax.Array) -> TrainState:
    """Initialise everything; jit this with ``out_shardings`` to place the state directly."""
    init_rng, state_rng = jax.random.split(rng)
    parts = objective.init(init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=parts["params"],
        opt_state=optimizer.init(parts["params"]),
        target_params=parts["target_params"],
        batch_stats=parts["batch_stats"],
        obj_state=parts["obj_state"],
        rng=state_rng,
    )

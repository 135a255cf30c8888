"""``build_program(config, durations)``: what gets compiled for one config -- the objective, the optimizer, the
jitted init and the jitted (or pmapped) train step -- and nothing else (no storage, logging or data), so the
trainer, the benchmarks and accelerator checks build the same program without TensorFlow in the process.

Plugging in another objective: ``config.objective`` names a module in ``swin_ssl/objectives``
(``validate.OBJECTIVE_MODULES``) that provides ``make_objective(config, *, durations, axis_name=None) ->
Objective`` (see ``swin_ssl/train/state.py``); nothing else in the trainer changes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import ml_collections

from swin_ssl.train import optim as optim_lib
from swin_ssl.train import parallel as parallel_lib
from swin_ssl.train import step as step_lib
from swin_ssl.train.state import Objective, TrainState, create_train_state
from swin_ssl.train.validate import Durations, objective_module


def make_objective(config: ml_collections.ConfigDict, durations: Durations, axis_name: str | None) -> Objective:
    return objective_module(config.objective).make_objective(config, durations=durations, axis_name=axis_name)


@dataclasses.dataclass
class Program:
    """Everything compiled for one config on one set of devices."""
    parallel: parallel_lib.Parallel
    objective: Objective
    optimizer: optim_lib.Optimizer
    init: Callable[[jax.Array], TrainState]   # jitted, output replicated on the mesh
    step: Callable                             # jitted/pmapped (state, batch) -> (state, metrics), donates state


def build_program(config: ml_collections.ConfigDict, durations: Durations) -> Program:
    par = parallel_lib.make_parallel(config.parallelism)
    objective = make_objective(config, durations, par.axis_name)
    optimizer = optim_lib.make_optimizer(config.optim, total_steps=durations.total_steps,
                                         warmup_steps=durations.warmup_steps, global_batch=int(config.batch_size),
                                         freeze_steps=durations.freeze_steps)
    train_step = functools.partial(step_lib.train_step, objective=objective, optimizer=optimizer,
                                   axis_name=par.axis_name)
    init = jax.jit(functools.partial(create_train_state, objective, optimizer.tx), out_shardings=par.replicated)
    return Program(par, objective, optimizer, init, par.compile_step(train_step))

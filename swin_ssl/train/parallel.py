"""Device placement: jit over a ``("data",)`` mesh by default, pmap on request.

``jit`` (default): the batch is one global ``jax.Array`` sharded over ``"data"``, the state is replicated, the
step is ``jax.jit(..., donate_argnums=0)``. BatchNorm statistics, MoBY's enqueue and DINO's centers are global
without a single explicit collective. The mesh is built with ``AxisType.Auto`` (``jax.make_mesh`` defaults to
Explicit axes, under which Swin's window reshapes of a batch-sharded array raise ``ShardingTypeError``).

``pmap``: the same step under ``jax.pmap(axis_name="batch")`` with the state unmapped (``in_axes=None``,
``out_axes=None``) and each device given ``batch / n_devices`` examples; the objective is built with the axis
name (BN ``axis_name``, ``all_gather`` of keys) and the step ``pmean``s gradients, loss and metrics.

Multi-host: every process runs the same program after ``jax.distributed.initialize()`` (see
:func:`maybe_initialize_distributed`), reads only its own shard of the data (``batch / process_count``
examples) and :func:`Parallel.put_batch` assembles the global array with
``jax.make_array_from_process_local_data``. The pmap path is exercised single-process only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PMAP_AXIS = "batch"


def maybe_initialize_distributed(dist) -> None:
    """``jax.distributed.initialize`` from ``config.distributed`` (no-op unless ``dist.initialize``).

    Empty fields are left to JAX's cluster auto-detection (TPU pods, SLURM, ...). ``dist.cpu_collectives``
    ("gloo") enables cross-process collectives on CPU (used by the localhost multi-process test).
    """
    if dist is None or not dist.get("initialize", False):
        return
    if dist.get("cpu_collectives"):
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id")
              if dist.get(k) is not None and dist.get(k) != ""}
    logging.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)


def make_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """1-D mesh over all (global) devices, Auto axis type."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (axis_name,), axis_types=(AxisType.Auto,))


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How a step is placed: ``kind`` "jit" or "pmap" over ``mesh``."""
    kind: str
    mesh: Mesh

    @property
    def axis_name(self) -> str | None:
        """Axis the objective/step must reduce over explicitly (pmap), None under jit."""
        return PMAP_AXIS if self.kind == "pmap" else None

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def data_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.mesh.axis_names[0]))

    def context(self):
        """``jax.set_mesh(mesh)`` for the jit path (so objectives may write sharding constraints with bare
        ``PartitionSpec``s, e.g. ``P("data")``); nothing under pmap, which brings its own mesh."""
        return jax.set_mesh(self.mesh) if self.kind == "jit" else contextlib.nullcontext()

    def put_batch(self, local_batch: dict) -> dict:
        """Host-local batch (this process's examples) -> what the compiled step takes.

        jit: one global array per key, sharded over "data" (leading dim = global batch).
        pmap: ``[local_devices, per_device, ...]`` host arrays, pmap places them.
        """
        if self.kind == "pmap":
            n = self.mesh.devices.size
            return jax.tree.map(lambda x: np.asarray(x).reshape((n, -1) + x.shape[1:]), local_batch)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x)),
                            local_batch)

    def compile_step(self, fn: Callable, donate: bool = True) -> Callable:
        """``fn(state, batch) -> (state, metrics)`` placed on the mesh; the state buffer is donated."""
        donate_argnums = (0,) if donate else ()
        if self.kind == "pmap":
            return jax.pmap(fn, axis_name=PMAP_AXIS, in_axes=(None, 0), out_axes=(None, None),
                            donate_argnums=donate_argnums, devices=list(self.mesh.devices.flat))
        return jax.jit(fn, in_shardings=(self.replicated, self.data_sharding),
                       out_shardings=(self.replicated, self.replicated), donate_argnums=donate_argnums)


def make_parallel(kind: str = "jit", devices=None) -> Parallel:
    """``kind`` "jit" or "pmap". Under pmap the mesh's axis is named like pmap's, so the replicated state we
    create has exactly the sharding pmap returns (otherwise the second step recompiles)."""
    if kind not in ("jit", "pmap"):
        raise ValueError(f"config.parallelism must be 'jit' or 'pmap', got {kind!r}")
    if kind == "pmap":
        devices = jax.local_devices() if devices is None else devices
        return Parallel(kind=kind, mesh=make_mesh(devices, PMAP_AXIS))
    return Parallel(kind=kind, mesh=make_mesh(devices))

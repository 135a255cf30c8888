"""Logging through clu, behind one small module (clu's last release is from 2024; keep the surface here).

* :func:`create_writer` -- TensorBoard event files in the workdir + console (absl logging); processes other than
  0 only log, so a multi-host run writes one set of event files.
* :func:`report_progress` -- ``periodic_actions.ReportProgress`` (steps/s, ETA, ``steps_per_sec`` scalar).
* :func:`log_parameter_overview` -- clu's name/shape/size/mean/std table of a parameter tree.

The training health signals written by the loop (see ``swin_ssl/train/step.py`` and the objectives):
``loss``, ``lr``, ``weight_decay``, ``momentum`` (EMA), ``grad_norm`` (before clipping), ``update_norm``,
``param_norm`` and, for MoBY, ``pos_logit`` / ``neg_logit`` (mean cosine / T of the positive pair and of the
queue negatives) and ``key_std`` (per-dimension std of the L2-normalised target keys over the global batch:
about ``1/sqrt(dim)`` = 0.0625 for 256-d keys spread on the sphere, -> 0 when the representation collapses).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions


class _DropLibraryInfo(logging.Filter):
    """Drops INFO/DEBUG records from the given libraries (orbax logs several lines per array per save)."""

    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(f in record.pathname for f in self.fragments)


def quiet_library_logs(fragments: tuple[str, ...] = ("/orbax/",)) -> None:
    """Keep orbax's warnings and errors, drop its INFO chatter from the (absl) console log. Idempotent."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropLibraryInfo) for f in absl_logger.filters):
        absl_logger.addFilter(_DropLibraryInfo(fragments))


def create_writer(workdir: str | None, asynchronous: bool = True) -> metric_writers.MetricWriter:
    """TensorBoard + console on process 0; console-only elsewhere (and when ``workdir`` is None)."""
    just_logging = workdir is None or jax.process_index() > 0
    return metric_writers.create_default_writer(workdir, just_logging=just_logging, asynchronous=asynchronous)


def write_scalars(writer: metric_writers.MetricWriter, step: int, scalars: Mapping[str, Any]) -> None:
    writer.write_scalars(step, {k: float(np.asarray(v)) for k, v in scalars.items()})


def write_hparams(writer: metric_writers.MetricWriter, config) -> None:
    """The config as flat hparams (TensorBoard's HPARAMS tab); lists/None are written as strings."""
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(name + ".", value)
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config.to_dict())
    writer.write_hparams(flat)


def report_progress(num_train_steps: int, writer: metric_writers.MetricWriter,
                    every_steps: int | None = None, every_secs: float | None = 60.0):
    return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_steps=every_steps, every_secs=every_secs)


def log_parameter_overview(params, msg: str) -> None:
    """clu's parameter table (process 0 only) plus a one-line total."""
    params = jax.device_get(params)
    parameter_overview.log_parameter_overview(params, msg=msg, include_stats=True, jax_logging_process=0)
    total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    if jax.process_index() == 0:
        logging.info("%s: %s parameters", msg, f"{total:,}")

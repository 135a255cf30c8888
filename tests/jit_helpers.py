"""Compiling in tests: counting compilations of a jitted function, and placing a test function like the train
step (state replicated, batch split) but with outputs the test wants to inspect (gradients, per-device values).

JAX logs one "Compiling jit(<name>) ..." record per compilation under ``jax.log_compiles``; a recompiled train
step shows up as a second record."""
import contextlib
import logging

import jax


@contextlib.contextmanager
def count_compilations(name: str):
    """Yields a list that collects one entry per compilation of a jitted function named ``name``."""
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(f"Compiling jit({name}) "):
                seen.append(record.getMessage()[:200])

    logger = logging.getLogger("jax._src.interpreters.pxla")
    handler = Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield seen
    finally:
        logger.removeHandler(handler)


def compile_like_step(par, fn, out_axes=None):
    """``fn(state, batch)`` placed as ``par`` places the train step, without donation; pmap outputs keep the device
    axis where ``out_axes`` says (None: replicated)."""
    from swin_ssl.train.parallel import PMAP_AXIS

    if par.kind == "pmap":
        return jax.pmap(fn, axis_name=PMAP_AXIS, in_axes=(None, 0), out_axes=out_axes,
                        devices=list(par.mesh.devices.flat))
    return jax.jit(fn, in_shardings=(par.replicated, par.data_sharding), out_shardings=par.replicated)

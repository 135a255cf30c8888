"""Host memory for XLA:CPU (opt-in, ``SWIN_SSL_HOST_MALLOC=keep``): keep freed memory mapped, so a compiled
program's scratch buffer is reused.

XLA:CPU gives each call of a compiled program one scratch allocation for all its temporaries (1.47 GB for a
Swin-T forward+backward at batch 8, 224 px). glibc's ``malloc`` serves a block that large with a fresh ``mmap``
and unmaps it on ``free``, so every call faults in and the kernel zero-fills ~375,000 new 4 KB pages (about a
fifth of the call's CPU time on a 2-core machine). With one malloc arena, ``mmap`` turned off and trimming turned
off, the block comes from the heap and stays there for the next call: few or no page faults after the first.
PyTorch allocates per tensor and takes ~10x fewer faults per step, so it gains little from the same settings.

The cost: the process keeps its peak heap (it is reused, not returned to the kernel), and all threads share one
arena. That arena is contended by every thread that allocates: compiles take 10-25 % longer, and with the tf.data
input pipeline in the same process ``make demo``'s training ran 1.4-1.6x *slower* (the step alone, fed one fixed
batch, ran 1.17x faster). So it is off unless asked for: it pays where the compiled step is the work (a step fed
from memory, the step benchmarks), not in a training run with its input pipeline. On a GPU or TPU host the
temporaries live in device memory, so it never applies there.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

OPT_IN_ENV = "SWIN_SSL_HOST_MALLOC"  # "keep": apply the settings below; anything else: glibc's defaults
# mallopt() parameters (glibc's malloc.h) and the values set: one arena, no mmap, never trim (-1 is SIZE_MAX).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def jax_will_run_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting any backend: the first platform in
    ``JAX_PLATFORMS`` when it is set, else whether no accelerator plugin (``jax_plugins``, ``libtpu``) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = importlib.util.find_spec("jax_plugins") or importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and importlib.util.find_spec("libtpu") is None


def keep_freed_memory_mapped() -> bool:
    """Applies the settings above when ``SWIN_SSL_HOST_MALLOC=keep`` and JAX will run on the CPU (glibc on Linux
    only); returns whether it did.

    Call it first thing in a process, before JAX starts its backend: threads that already own a malloc arena
    keep it, and XLA's worker threads are the ones that allocate the scratch buffer."""
    if os.environ.get(OPT_IN_ENV) != "keep" or not sys.platform.startswith("linux") or not jax_will_run_on_cpu():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library; absent outside glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in SETTINGS])

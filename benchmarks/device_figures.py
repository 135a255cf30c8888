"""What the step benchmarks report about the device: XLA's FLOP count of a compiled program, the device's
matrix-multiply rate measured in the same process, model-FLOP utilisation (MFU) against it and against the
vendor's dense peak where known, and peak memory. Imported by ``throughput.py``, ``moby_step.py`` and
``esvit_step.py`` (benchmarks run as scripts, so this sits beside them)."""
from __future__ import annotations

import math
import resource
import time

# Vendors' dense (no sparsity) bf16 matrix peaks, FLOP/s, by ``jax.Device.device_kind``.
DATASHEET_BF16_PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}


def xla_flops(lowered) -> float:
    """FLOPs of one call of a program (all devices together) by XLA's cost analysis of the lowered, not yet
    optimised HLO, a multiply-add counting 2. Not the compiled program's count: on a GPU that gave a seventh of
    this for the MoBY step (the cuBLAS custom calls uncounted, presumably)."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


PEAK_SIZE = {"cpu": 2048, "accelerator": 8192}  # n of the n x n x n product that measures the matmul rate
PEAK_CALLS = 5


def matmul_peak(dtype: str, size: int | None = None, calls: int = PEAK_CALLS) -> float:
    """One device's sustained matmul rate in FLOP/s: the best of ``calls`` size^3 products (``PEAK_SIZE``),
    timed after one warm-up call."""
    import jax
    import jax.numpy as jnp

    size = size or PEAK_SIZE["cpu" if jax.devices()[0].platform == "cpu" else "accelerator"]
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), getattr(jnp, dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def utilisation_line(flops_per_step: float, seconds_per_step: float, dtype: str) -> str:
    """Achieved FLOP/s per device and MFU against one device's measured matmul rate (and the datasheet's bf16
    peak where known); ``flops_per_step`` counts all devices (``xla_flops``)."""
    import jax

    if not math.isfinite(flops_per_step):  # jax 0.11.2 on a GPU: the lowered step's analysis had no "flops"
        return ("XLA gave no FLOP count for this step here; for MFU, count it on the CPU with "
                "benchmarks/step_flops.py (--seconds, --peak)")
    devices = jax.device_count()
    achieved = flops_per_step / seconds_per_step / devices
    measured = matmul_peak(dtype)
    line = (f"XLA count {flops_per_step / 1e12:.3f} TFLOP/step -> {achieved / 1e12:.1f} TFLOP/s per device "
            f"({devices}); MFU {achieved / measured:.1%} of the measured {dtype} matmul rate "
            f"({measured / 1e12:.1f} TFLOP/s)")
    peak = DATASHEET_BF16_PEAK.get(jax.devices()[0].device_kind) if dtype == "bfloat16" else None
    if peak:
        line += f", {achieved / peak:.1%} of the datasheet's {peak / 1e12:.0f} TFLOP/s"
    return line


def peak_memory_line() -> str:
    """The device's peak bytes in use where the runtime reports it (GPU, TPU), else the process's max RSS."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device peak ({dev.device_kind})"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host max RSS (process)"

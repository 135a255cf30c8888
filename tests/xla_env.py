"""The XLA flags of every test process (pytest's own, and the train.py / worker processes the tests start).

The suite is compile-bound: its programs are small and run in milliseconds, while XLA:CPU spends seconds
optimising and generating code for each. The lowest backend optimisation level and the FAST_COMPILE preset
cut the compile time of the smoke train step about fivefold (26 s -> 5 s); what is computed stays the same
and every comparison in the suite (bitwise resumes, NumPy/PyTorch parity within tolerances) holds with them.
"""

COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_cpu_opt_preset=FAST_COMPILE"


def xla_flags(device_count: int) -> str:
    """XLA_FLAGS for a test process with ``device_count`` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={device_count} {COMPILE_FAST}"

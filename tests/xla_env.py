"""The XLA flags of every test process (pytest's own, and the train.py / worker processes the tests start).

The suite is compile-bound: its programs are small and run in milliseconds, while XLA:CPU spends seconds
optimising each; the lowest backend optimisation level roughly halves compile time and changes no result the
tests compare. TensorFlow's own XLA reads XLA_FLAGS too and aborts on a flag it does not know, so only flags
that both JAX's and TensorFlow's XLA accept belong here (JAX's ``--xla_cpu_opt_preset`` is not one of them).
"""

COMPILE_FAST = "--xla_backend_optimization_level=0"


def xla_flags(device_count: int) -> str:
    """XLA_FLAGS for a test process with ``device_count`` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={device_count} {COMPILE_FAST}"

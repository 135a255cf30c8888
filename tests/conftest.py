"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite is written for 8 simulated CPU devices, also on a machine that has a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

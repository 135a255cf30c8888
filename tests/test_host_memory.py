"""XLA:CPU's scratch buffer stays mapped between calls (no page faults after the first call) once
``host_memory.keep_freed_memory_mapped()`` ran with ``SWIN_SSL_HOST_MALLOC=keep``; GPU/TPU processes and processes
that did not ask are left alone."""
import json
import os
import subprocess
import sys

import pytest

from swin_ssl import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program with a 64 MiB temporary (the [1024, 16384] product), above the size glibc serves with mmap by default.
FAULTS_PER_CALL = r"""
import json, resource
from swin_ssl import host_memory
applied = host_memory.keep_freed_memory_mapped()
import jax, jax.numpy as jnp
x = jnp.ones((1024, 256)); w = jnp.ones((256, 16384)) / 256; v = jnp.ones((16384, 8))
f = jax.jit(lambda x, w, v: (x @ w) @ v)
f(x, w, v).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w, v).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _faults(mode):
    env = {k: v for k, v in os.environ.items() if k != host_memory.OPT_IN_ENV}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if mode == "keep":
        env[host_memory.OPT_IN_ENV] = "keep"
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_scratch_buffer_is_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    pages = 64 * 2**20 // 4096  # the temporary alone, in 4 KiB pages
    assert not default["applied"] and kept["applied"]
    assert min(default["faults"]) > pages // 2, default  # glibc maps it afresh on every call, without exception
    # Calls find it on the heap (on a busy machine some calls still fault it in again, not all of them).
    assert min(kept["faults"]) < pages // 20, kept


@pytest.mark.parametrize("platforms,expected", [("cuda", False), ("tpu,cpu", False), ("cpu", True)])
def test_only_cpu_processes_are_changed(platforms, expected, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.jax_will_run_on_cpu() is expected


@pytest.mark.parametrize("value", [None, "default", "1"])
def test_off_unless_asked_for(value, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if value is None:
        monkeypatch.delenv(host_memory.OPT_IN_ENV, raising=False)
    else:
        monkeypatch.setenv(host_memory.OPT_IN_ENV, value)
    assert host_memory.keep_freed_memory_mapped() is False

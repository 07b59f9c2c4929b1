"""``host_memory``: with freed memory kept, a jitted call's temporaries fault no pages in again.

Each case runs in a fresh interpreter that calls ``keep_freed_memory`` before using JAX (the
settings must be made before JAX starts its threads, and they last for the process). The measure
is the kernel's count of minor page faults (``getrusage``) around the second call of a jitted
function whose temporary buffer is 72 MiB (18,432 pages of 4 KiB), above glibc's largest mmap
threshold (32 MiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from difflora_jax import host_memory

PROBE = """
import json, resource
from difflora_jax import host_memory
host_memory.keep_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(q, k):
    logits = jnp.einsum("btd,bsd->bts", q, k)  # [24, 1536, 512] float32: a 72 MiB temporary
    return jnp.sum(logits, axis=-1)

q = jnp.linspace(0.0, 1.0, 24 * 1536 * 64).reshape(24, 1536, 64)
k = q[:, :512]
jax.block_until_ready(f(q, k))
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(q, k))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": host_memory.keep_freed_memory(), "faults": min(faults)}))
"""


def _probe(keep: str) -> dict:
    env = dict(os.environ, **{host_memory.ENV: keep})
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the malloc settings are glibc's")
def test_kept_memory_faults_no_pages_in_again_and_the_default_malloc_does():
    kept, default = _probe("1"), _probe("0")
    assert kept["kept"] is True and default["kept"] is False
    # The 72 MiB temporary is 18,432 pages; the default malloc maps it afresh on every call.
    assert default["faults"] >= 18_432, default
    assert kept["faults"] < 1_000, kept


def test_not_applied_once_jax_has_started():
    """In this process JAX has run already: its threads keep their arenas, so nothing is set
    (and the header line says so)."""
    import jax

    jax.block_until_ready(jax.numpy.ones(2) + 1)
    fresh = dict(host_memory._state)
    host_memory._state.clear()
    try:
        assert host_memory.keep_freed_memory() is False
        assert "not in force" in host_memory.describe()
    finally:
        host_memory._state.clear()
        host_memory._state.update(fresh)

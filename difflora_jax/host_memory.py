"""Keep freed host memory in the process: glibc malloc settings that spare XLA:CPU page faults.

XLA:CPU allocates an executable's temporary buffers and outputs with ``malloc`` on every call.
glibc serves large requests from fresh ``mmap`` pages (or from per-thread arenas that it shrinks
again), and hands them back to the kernel on ``free``, so every call faults each page of its
temporaries in anew: one 4 x 512 LoRA train step of SmolLM2-135M on the 2-core CPU took about
812,000 minor page faults (3.3 GB of pages) and 2.1-3.2 s of system CPU time. PyTorch pays the
same on CPU for every fresh tensor (PyTorch's performance tuning guide suggests jemalloc or
TCMalloc for it).

:func:`keep_freed_memory` asks glibc (``mallopt``) for one arena (``M_ARENA_MAX`` 1), no
``mmap`` for large blocks (``M_MMAP_MAX`` 0) and no trimming of the heap's top
(``M_TRIM_THRESHOLD`` -1): freed blocks stay mapped and the next call reuses them, faulting
nothing. Costs: the process keeps its peak heap until it exits, and compiling is slower (the
same train step compiled in a median 29.3 s against 24.2 s, three alternating runs each; with
one codegen thread it was no faster, so the cause is not contention among codegen threads). So it pays off over a run of
many steps, not in a session of many small programs. The ``difflora`` command calls it before
anything starts JAX; a script or notebook calls it first thing. It takes effect only before JAX
has started its backend (whose threads would keep their own arenas), and only on Linux with
glibc; set ``DIFFLORA_JAX_KEEP_FREED_MEMORY=0`` to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "DIFFLORA_JAX_KEEP_FREED_MEMORY"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim

_state: dict[str, bool] = {}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def _jax_started() -> bool:
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def keep_freed_memory() -> bool:
    """Apply the malloc settings above once per process; return whether they are in force.

    Not applied (False) when ``DIFFLORA_JAX_KEEP_FREED_MEMORY`` is ``0``, off glibc, or once
    JAX has started its backend."""
    if "applied" not in _state:
        libc = None
        if os.environ.get(ENV, "1") != "0" and not _jax_started():
            libc = _glibc()
        ok = libc is not None
        if libc is not None:
            libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            ok = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
        _state["applied"] = ok
    return _state["applied"]


def describe() -> str:
    """One line for benchmark headers: whether freed memory is kept."""
    if _state.get("applied"):
        return "glibc malloc keeps freed memory (one arena, no mmap, no trim)"
    return "malloc as the system set it (`difflora_jax.host_memory` not in force)"

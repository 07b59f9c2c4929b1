"""``jit_donating``: ``jax.jit`` that donates buffers except on CPU, which cannot reuse them (and
warns). The backend is looked up at the first call, not at import (so ``jax.distributed`` can
still be initialised after importing this package)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax


def jit_donating(**jit_kwargs: Any) -> Callable:
    """Decorator: ``jax.jit(fn, **jit_kwargs)``, minus ``donate_argnums``/``donate_argnames``
    when the default backend is the CPU."""
    donation = {
        k: jit_kwargs.pop(k) for k in ("donate_argnums", "donate_argnames") if k in jit_kwargs
    }

    def decorate(fn: Callable) -> Callable:
        compiled: dict[bool, Callable] = {}

        @functools.wraps(fn)
        def call(*args, **kwargs):
            donate = jax.default_backend() != "cpu"
            if donate not in compiled:
                compiled[donate] = jax.jit(fn, **jit_kwargs, **(donation if donate else {}))
            return compiled[donate](*args, **kwargs)

        return call

    return decorate

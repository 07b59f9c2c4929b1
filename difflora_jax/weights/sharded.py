"""Loading a checkpoint (safetensors or GGUF) straight into shards on a mesh.

Each device's shard of each parameter is read from the file on its own
(``safe_open(...).get_slice``), through ``jax.make_array_from_callback``, so no process ever
holds a whole tensor it does not itself keep, and a process reads only the bytes of the shards
its devices hold. The HF tensor of a linear kernel is ``[prod(out), prod(in)]``; our shard
``[in..., out...]`` maps to one row range and one column range of it when each axis group is
split on its first split axis only (what the rules give: ``embed`` on inputs, ``heads`` /
``kv_heads`` / ``mlp`` / ``vocab`` leading the outputs); otherwise the group's whole range is
read and cut in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from difflora_jax.errors import CheckpointError
from difflora_jax.parallel import Rules, sharding_of
from difflora_jax.weights.layout import TensorMap


class BlockReader(Protocol):
    """A checkpoint that reads blocks of tensors (safetensors, GGUF)."""

    def shape_of(self, name: str) -> tuple[int, ...]: ...

    def read_block(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


def _bounds(index: tuple, shape: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for i, size in enumerate(shape):
        part = index[i] if i < len(index) else slice(None)
        start, stop, _ = part.indices(size)
        out.append((start, stop))
    return out


def _flat_range(dims: Sequence[int], bounds: Sequence[tuple[int, int]]) -> tuple[int, int, bool]:
    """The flattened range of a block of a row-major group of axes, and whether the block is
    exactly that range (True when only the first partial axis is cut, after unit axes)."""
    partial = [i for i, (b, size) in enumerate(zip(bounds, dims)) if b != (0, size)]
    if not partial:
        return 0, math.prod(dims), True
    k = partial[0]
    exact = all(i == k for i in partial) and all(bounds[i][1] - bounds[i][0] == 1 for i in range(k))
    if not exact:
        return 0, math.prod(dims), False
    inner = math.prod(dims[k + 1 :])
    outer = int(np.ravel_multi_index([b[0] for b in bounds[:k]], dims[:k])) if k else 0
    lo = (outer * dims[k] + bounds[k][0]) * inner
    hi = (outer * dims[k] + bounds[k][1]) * inner
    return lo, hi, True


def read_shard(checkpoint: BlockReader, entry: TensorMap, index: tuple, dtype) -> np.ndarray:
    """Our parameter ``entry``'s block ``index``, read from the HF tensor and laid out as ours."""
    bounds = _bounds(index, entry.shape)
    if entry.n_in == 0:
        block = checkpoint.read_block(entry.hf_name, tuple(slice(a, b) for a, b in bounds))
        return np.asarray(block).astype(dtype)
    n_in = entry.n_in
    in_dims, out_dims = entry.shape[:n_in], entry.shape[n_in:]
    in_bounds, out_bounds = bounds[:n_in], bounds[n_in:]
    c0, c1, in_exact = _flat_range(in_dims, in_bounds)
    r0, r1, out_exact = _flat_range(out_dims, out_bounds)
    block = np.asarray(checkpoint.read_block(entry.hf_name, (slice(r0, r1), slice(c0, c1))))
    read_in = [b - a for a, b in in_bounds] if in_exact else list(in_dims)
    read_out = [b - a for a, b in out_bounds] if out_exact else list(out_dims)
    ours = block.T.reshape(*read_in, *read_out)
    local = [slice(None) if in_exact else slice(a, b) for a, b in in_bounds]
    local += [slice(None) if out_exact else slice(a, b) for a, b in out_bounds]
    return ours[tuple(local)].astype(dtype)


def fill_sharded(
    model: nnx.Module,
    layout: dict[str, TensorMap],
    checkpoint: BlockReader,
    mesh: Mesh,
    rules: Rules,
    dtype,
    source: str,
) -> None:
    """Set every parameter of the abstract ``model`` to a sharded array read shard by shard."""
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        key = ".".join(str(p) for p in path)
        entry = layout[key]
        shape = checkpoint.shape_of(entry.hf_name)
        if shape != entry.hf_shape:
            raise CheckpointError(
                f"{source}: tensor {entry.hf_name!r} has shape {shape}, but the config expects "
                f"{entry.hf_shape}"
            )
        sharding = sharding_of(
            entry.shape, getattr(variable, "logical_axes", None), mesh, rules, what=key
        )
        blocks: dict[tuple, np.ndarray] = {}  # replicated shards are read once

        def callback(index, entry=entry, blocks=blocks):
            cache_key = tuple((s.start, s.stop) for s in index)
            if cache_key not in blocks:
                block = read_shard(checkpoint, entry, index, dtype)
                if not np.all(np.isfinite(block.astype(np.float32))):
                    raise CheckpointError(
                        f"{source}: tensor {entry.hf_name!r} holds NaN or inf values"
                    )
                blocks[cache_key] = block
            return blocks[cache_key]

        variable.set_value(jax.make_array_from_callback(entry.shape, sharding, callback))

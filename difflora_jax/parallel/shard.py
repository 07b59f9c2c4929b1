"""Shardings of a model's state, the optimizer state and batches, from the logical-axis rules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from difflora_jax.parallel.rules import Rules, logical_spec, mesh_axes_of, sharding_of


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A state of the same structure holding each variable's ``NamedSharding``: its
    ``logical_axes`` through ``rules`` (variables without them, such as RNG state, and
    vectors are replicated)."""

    def one(path, variable):
        value = variable.get_value()
        axes = getattr(variable, "logical_axes", None)
        return variable.replace(
            sharding_of(value.shape, axes, mesh, rules, what=f"parameter {_path_name(path)}")
        )

    return nnx.map_state(one, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> None:
    """Move every variable of ``model`` onto ``mesh`` as the rules say (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(
        lambda v, s: jax.device_put(v, s),
        nnx.to_pure_dict(state),
        nnx.to_pure_dict(shardings),
    )
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every array of ``tree`` (what jit's in/out shardings take)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def optimizer_shardings(
    tx: optax.GradientTransformation, opt_state: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """Each optimizer-state entry's sharding: that of its parameter for the per-parameter
    entries (Adam's moments), replicated for the rest (step counts)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """``[batch, length]`` token arrays: rows over the ``batch`` rule's mesh axes."""
    return NamedSharding(mesh, logical_spec(("batch", "length"), rules))


def batch_split(mesh: Mesh, rules: Rules) -> tuple[tuple[str, ...], int]:
    """The mesh axes the batch rows are split over, and how many devices that is."""
    axes = mesh_axes_of(logical_spec(("batch",), rules)[0])
    return axes, math.prod(mesh.shape[a] for a in axes)


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a ``[batch, ...]`` array this process holds under ``sharding`` (one
    contiguous range: what it feeds ``jax.make_array_from_process_local_data``)."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = slice(None) if index is None else index[0]
        starts.append(rows.start or 0)
        stops.append(global_shape[0] if rows.stop is None else rows.stop)
    lo, hi = min(starts), max(stops)
    covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    if covered != hi - lo:
        raise ValueError(f"this process's rows of {global_shape} are not one contiguous range")
    return slice(lo, hi)


def global_batch(
    batch: Mapping[str, np.ndarray], sharding: NamedSharding, *, global_rows: int | None = None
) -> dict[str, jax.Array]:
    """The global batch on the mesh from this process's host batch, fed to
    ``jax.make_array_from_process_local_data``: either all global rows (every process iterates
    the same data order; each passes only the rows its devices hold, ``local_rows``), or, when
    it has fewer than ``global_rows`` rows, exactly this process's rows (streamed data)."""
    arrays = {key: np.asarray(value) for key, value in batch.items()}
    shape = next(iter(arrays.values())).shape
    full = (global_rows if global_rows is not None else shape[0], *shape[1:])
    if shape[0] == full[0]:
        rows = local_rows(sharding, full)
        arrays = {key: value[rows] for key, value in arrays.items()}
    return {
        key: jax.make_array_from_process_local_data(sharding, value, full)
        for key, value in arrays.items()
    }


def init_optimizer(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """``tx.init(params)`` with each entry placed as :func:`optimizer_shardings` says."""
    abstract = jax.eval_shape(tx.init, params)
    shardings = optimizer_shardings(tx, abstract, shardings_of(params), mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)

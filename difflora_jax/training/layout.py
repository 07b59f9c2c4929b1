"""The train step's layout of the adapters and dropout streams: each scanned run stacked.

``split_for_training`` gives the adapter parameters and the dropout RNG state per layer
(``{"layers": {0: ..., 1: ...}}``, the layout of checkpoints, exports and ``write_back``). The
training loop keeps them, and the optimizer state built from the parameters, in the *stacked*
layout instead: the layers of each run that executes as one ``lax.scan``
(``LlamaForCausalLM.layer_runs``, runs of more than one layer) move from ``"layers"`` to
``"layer_runs"``, keyed by ``(start, stop)``, as one layer's structure whose arrays carry a
leading axis of ``stop - start``::

    {"layers": {0: {...}, ..., 29: {...}}}  ->  {"layer_runs": {(0, 30): {...}}}

The scan then reads the adapters and streams as they are stored
(``modeling.llama.stacked_runs``) and hands back the gradients and advanced streams stacked,
so the step's gradient scaling, norm, clipping, AdamW update and non-finite guard run once
per stacked array (14 adapter arrays for LoRA r8 on SmolLM2-135M) rather than once per
layer's (420, and as many RNG arrays): the compiled step no longer grows with the depth. The numbers are those of the
per-layer layout.

The conversions work on any tree holding adapter-shaped dicts (the parameters, their gradients,
Adam's moments inside an optax state), on arrays and, with ``stack_sharding`` /
``unstack_sharding``, on the ``NamedSharding`` trees that place them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

RUNS_KEY = "layer_runs"
Run = tuple[int, int]


def scanned_runs(model: Any) -> tuple[Run, ...]:
    """The model's runs of layers that execute as one scan (``layer_runs`` of two or more)."""
    return tuple((a, b) for a, b in model.layer_runs() if b - a > 1)


def _per_layer_dict(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get("layers"), dict)


def _stacked_dict(node: Any) -> bool:
    return isinstance(node, dict) and isinstance(node.get(RUNS_KEY), dict)


def stack_layers(
    tree: Any,
    runs: Sequence[Run],
    combine: Callable[[list[Any]], Any] = jnp.stack,
) -> Any:
    """``tree`` with every per-layer adapter dict in the stacked layout: the layers of each run
    in ``runs`` combined by ``combine`` (``jnp.stack`` of arrays; ``stack_sharding`` of
    shardings). A run whose layers carry no adapters is left out; layers outside ``runs`` stay
    under ``"layers"``."""

    def one(node):
        if not _per_layer_dict(node):
            return node
        layers = dict(node["layers"])
        stacked = {}
        for start, stop in runs:
            present = [i for i in range(start, stop) if i in layers]
            if not present:
                continue
            if len(present) != stop - start:
                raise ValueError(
                    f"layers {start}..{stop - 1} run as one scan, but only {present} carry adapters"
                )
            parts = [layers.pop(i) for i in present]
            stacked[(start, stop)] = jax.tree.map(lambda *a: combine(list(a)), *parts)
        out = {k: v for k, v in node.items() if k != "layers"}
        if layers:
            out["layers"] = layers
        if stacked:
            out[RUNS_KEY] = stacked
        return out

    return jax.tree.map(one, tree, is_leaf=_per_layer_dict)


def unstack_layers(
    tree: Any,
    split: Callable[[Any, int], list[Any]] | None = None,
) -> Any:
    """The per-layer layout of a tree that ``stack_layers`` made: each run's stacked leaves cut
    into their layers by ``split(leaf, n)`` (array slices by default; ``unstack_sharding`` for
    shardings). A tree without stacked runs comes back as it is."""
    split = split or (lambda a, n: [a[j] for j in range(n)])

    def one(node):
        if not _stacked_dict(node):
            return node
        layers = dict(node.get("layers", {}))
        for (start, stop), stacked in node[RUNS_KEY].items():
            leaves, treedef = jax.tree.flatten(stacked)
            cut = [split(leaf, stop - start) for leaf in leaves]
            for j in range(stop - start):
                layers[start + j] = jax.tree.unflatten(treedef, [c[j] for c in cut])
        out = {k: v for k, v in node.items() if k != RUNS_KEY}
        out["layers"] = dict(sorted(layers.items()))
        return out

    return jax.tree.map(one, tree, is_leaf=_stacked_dict)


def stacked_part(params: dict) -> dict[Run, Any]:
    """``{(start, stop): stacked dict}`` of a stacked-layout dict (empty when none)."""
    return dict(params.get(RUNS_KEY, {}))


def with_stacked_part(tree: dict, stacks: dict[Run, Any]) -> dict:
    """A per-layer dict (``tree``) in the stacked layout, taking each run's stack from
    ``stacks`` rather than stacking the layers' own entries (which are dropped)."""
    if not stacks:
        return tree
    covered = {i for start, stop in stacks for i in range(start, stop)}
    out = {k: v for k, v in tree.items() if k != "layers"}
    layers = {i: v for i, v in tree.get("layers", {}).items() if i not in covered}
    if layers:
        out["layers"] = layers
    out[RUNS_KEY] = dict(stacks)
    return out


def merge_dicts(a: dict, b: dict) -> dict:
    """The union of two nested dicts whose leaves lie at different paths."""
    out = dict(a)
    for key, value in b.items():
        if key in out:
            if not (isinstance(out[key], dict) and isinstance(value, dict)):
                raise ValueError(f"both dicts hold a leaf at {key!r}")
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def in_stacked_run(path: tuple) -> bool:
    """Whether a ``jax.tree_util`` key path lies under ``"layer_runs"`` (its leaf carries the
    leading layers axis)."""
    return any(getattr(key, "key", None) == RUNS_KEY for key in path)


def stack_sharding(shardings: list[NamedSharding]) -> NamedSharding:
    """The sharding of a stack of arrays placed as ``shardings[0]``: the layers axis whole."""
    first = shardings[0]
    return NamedSharding(first.mesh, PartitionSpec(None, *first.spec))


def unstack_sharding(sharding: NamedSharding, n: int) -> list[NamedSharding]:
    """The shardings of the ``n`` layers of an array placed as ``sharding`` (its first axis
    whole)."""
    layer = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return [layer] * n


def has_stacked_runs(tree: Any) -> bool:
    """Whether ``tree`` holds a stacked-layout dict."""
    found: list[bool] = []
    jax.tree.map(lambda n: found.append(_stacked_dict(n)), tree, is_leaf=_stacked_dict)
    return any(found)


def _named(tree: Any) -> bool:
    return all(isinstance(x.sharding, NamedSharding) for x in jax.tree.leaves(tree))


def to_stacked(tree: Any, runs: Sequence[Run]) -> Any:
    """``stack_layers(tree, runs)`` computed on the devices; arrays carrying ``NamedSharding``s
    (the loop's) come back stacked as their layers were placed, the layers axis whole."""
    if not runs or not jax.tree.leaves(tree):
        return tree
    shardings = None
    if _named(tree):
        shardings = stack_layers(jax.tree.map(lambda x: x.sharding, tree), runs, stack_sharding)
    return jax.jit(lambda t: stack_layers(t, runs), out_shardings=shardings)(tree)


def to_per_layer(tree: Any) -> Any:
    """``unstack_layers(tree)`` computed on the devices, each layer placed as its stack was."""
    if not has_stacked_runs(tree):
        return tree
    shardings = None
    if _named(tree):
        shardings = unstack_layers(jax.tree.map(lambda x: x.sharding, tree), unstack_sharding)
    return jax.jit(unstack_layers, out_shardings=shardings)(tree)

"""The logical-axis rules: which mesh axes each named dimension is split over.

A rule maps a logical name to one mesh axis, a tuple of them (split over their product) or
``None`` (replicated). Parameters of rank 0 or 1 (norm scales, lambda vectors, group-norm
scales) are always replicated. LoRA factors carry the names of the weight they adapt plus
``rank`` (replicated), so ``A`` is split like the weight's input and ``B`` like its output.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from difflora_jax.errors import ConfigError
from difflora_jax.parallel.mesh import MESH_AXES

RuleValue = str | tuple[str, ...] | None
Rules = Mapping[str, RuleValue]

DEFAULT_RULES: dict[str, RuleValue] = {
    "batch": ("data", "fsdp"),  # activations: each data and fsdp shard holds its own rows
    "length": None,
    "embed": "fsdp",  # parameters: FSDP splits the model dimension of every matrix
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "rank": None,  # adapters: the low-rank dimension is tiny, never split
    "layers": None,  # the stacked-layers axis of a scan
}


def mesh_axes_of(value: RuleValue) -> tuple[str, ...]:
    """A rule's value (or a ``PartitionSpec`` entry) as a tuple of mesh axes."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, RuleValue]:
    """``DEFAULT_RULES`` with ``overrides`` (from YAML: a name to a mesh axis, a list of mesh
    axes, or null), each checked to name mesh axes only."""
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        if isinstance(value, list):
            value = tuple(value)
        axes = mesh_axes_of(value) if isinstance(value, str | tuple | type(None)) else None
        if axes is None or any(a not in MESH_AXES for a in axes) or len(set(axes)) != len(axes):
            raise ConfigError(
                f"sharding rule {name!r}: {value!r} is invalid: must be null, one of "
                f"{list(MESH_AXES)}, or a list of distinct ones"
            )
        rules[str(name)] = value
    return rules


def logical_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """The ``PartitionSpec`` of a value whose dimensions have logical names ``axes``. A mesh
    axis already used by an earlier dimension is not used again (that dimension replicates)."""
    used: set[str] = set()
    spec = []
    for name in axes:
        mesh_axes = tuple(
            a for a in mesh_axes_of(rules.get(name) if name else None) if a not in used
        )
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _check_divides(shape, spec: PartitionSpec, mesh: Mesh, axes, what: str) -> None:
    for dim, (size, entry, name) in enumerate(zip(shape, spec, axes)):
        mesh_axes = mesh_axes_of(entry)
        devices = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % devices:
            raise ConfigError(
                f"{what}: dimension {dim} ({name!r}) has size {size}, which mesh axis "
                f"{'x'.join(mesh_axes)} of {devices} devices does not divide; change the mesh "
                f"(mesh.{mesh_axes[0]}=...) or the rule for {name!r}"
            )


def sharding_of(
    shape: Sequence[int],
    axes: Sequence[str | None] | None,
    mesh: Mesh,
    rules: Rules,
    what: str = "value",
) -> NamedSharding:
    """The ``NamedSharding`` of a value of ``shape`` with logical ``axes`` (None: replicated).
    Rank 0 and 1 values are replicated. Raises ConfigError naming ``what``, the dimension, its
    size and the mesh axis when the mesh does not divide it."""
    if axes is None or len(shape) < 2:
        return NamedSharding(mesh, PartitionSpec())
    if len(axes) != len(shape):
        raise ValueError(f"{what}: logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    spec = logical_spec(axes, rules)
    _check_divides(shape, spec, mesh, axes, what)
    return NamedSharding(mesh, spec)


@dataclasses.dataclass(frozen=True)
class _Current:
    mesh: Mesh
    rules: Rules


_CURRENT: contextvars.ContextVar[_Current | None] = contextvars.ContextVar(
    "difflora_mesh", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Make ``mesh`` and ``rules`` (default: ``DEFAULT_RULES``) current: functions traced inside
    constrain their activations to them (:func:`constrain`), and the mesh is JAX's current
    mesh (so it is part of the jit cache key)."""
    token = _CURRENT.set(_Current(mesh, dict(DEFAULT_RULES if rules is None else rules)))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _CURRENT.reset(token)


def current_mesh() -> Mesh | None:
    """The mesh made current by :func:`use_mesh`, or None (one device)."""
    state = _CURRENT.get()
    return None if state is None else state.mesh


def constrain(x: jax.Array, axes: Sequence[str | None], what: str = "activation") -> jax.Array:
    """``x`` constrained to the sharding its logical ``axes`` get under the current mesh and
    rules; ``x`` unchanged when there is no current mesh (one device)."""
    state = _CURRENT.get()
    if state is None:
        return x
    spec = logical_spec(axes, state.rules)
    _check_divides(x.shape, spec, state.mesh, axes, what)
    return jax.lax.with_sharding_constraint(x, NamedSharding(state.mesh, spec))

"""Device meshes, the logical-axis sharding rules, and the multi-host start.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv_heads``, ``head_dim``,
``mlp``, ``vocab``, ``rank``); activations use ``batch`` and ``length``. A rules table
(:data:`DEFAULT_RULES`, overridable from YAML) maps each name to mesh axes among ``data``,
``fsdp`` and ``tensor``; :func:`sharding_of` turns a parameter's names into a ``NamedSharding``
on a mesh, refusing a mesh axis that does not divide the dimension. ``use_mesh`` makes a mesh
and its rules current, so the model constrains its activations at layer boundaries while it
is traced.
"""

from difflora_jax.parallel.distributed import gather_max, initialize_distributed, is_main_process
from difflora_jax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh
from difflora_jax.parallel.rules import (
    DEFAULT_RULES,
    Rules,
    constrain,
    current_mesh,
    logical_spec,
    make_rules,
    sharding_of,
    use_mesh,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "Rules",
    "constrain",
    "current_mesh",
    "gather_max",
    "initialize_distributed",
    "is_main_process",
    "logical_spec",
    "make_mesh",
    "make_rules",
    "sharding_of",
    "use_mesh",
]

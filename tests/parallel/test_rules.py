"""The logical-axis rules, mesh sizes and their errors (no devices needed: abstract meshes)."""

from __future__ import annotations

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from difflora_jax.errors import ConfigError
from difflora_jax.parallel import MESH_AXES, MeshConfig, logical_spec, make_rules, sharding_of
from difflora_jax.training.config import load_train_config


def _mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), MESH_AXES)


def test_default_rules_place_weights_adapters_and_activations():
    rules = make_rules()
    assert logical_spec(("embed", "heads", "head_dim"), rules) == PartitionSpec(
        "fsdp", "tensor", None
    )
    # a LoRA B of q_proj: rank whole, split like the weight's output
    assert logical_spec(("rank", "heads", "head_dim"), rules) == PartitionSpec(None, "tensor", None)
    assert logical_spec(("batch", "length", None), rules) == PartitionSpec(
        ("data", "fsdp"), None, None
    )
    # a mesh axis is used once per value: the second dimension mapped to it replicates
    assert logical_spec(("mlp", "vocab"), rules) == PartitionSpec("tensor", None)


def test_vectors_are_replicated_and_overrides_apply():
    mesh = _mesh(1, 4, 2)
    assert sharding_of((64,), ("embed",), mesh, make_rules()).spec == PartitionSpec()
    rules = make_rules({"vocab": None, "embed": ["fsdp", "tensor"]})
    spec = sharding_of((128, 64), ("vocab", "embed"), mesh, rules).spec
    assert spec == PartitionSpec(None, ("fsdp", "tensor"))


@pytest.mark.parametrize("bad", ["fsdpp", ["data", "data"], 3])
def test_bad_rules_are_refused(bad):
    with pytest.raises(ConfigError, match="sharding rule 'embed'"):
        make_rules({"embed": bad})


def test_a_mesh_that_does_not_divide_a_dimension_is_refused_by_name():
    axes = ("embed", "kv_heads", "head_dim")
    with pytest.raises(ConfigError) as error:
        sharding_of((576, 3, 64), axes, _mesh(1, 1, 2), make_rules(), what="k_proj.kernel")
    message = str(error.value)
    for part in ("k_proj.kernel", "'kv_heads'", "size 3", "tensor of 2 devices"):
        assert part in message


def test_mesh_sizes():
    assert MeshConfig().resolve(8) == (8, 1, 1)
    assert MeshConfig(data=2, fsdp=-1).resolve(8) == (2, 4, 1)
    assert MeshConfig(data=1, fsdp=2, tensor=4).resolve(8) == (1, 2, 4)
    with pytest.raises(ConfigError, match="needs 6 devices, but 8"):
        MeshConfig(data=1, fsdp=2, tensor=3).resolve(8)
    with pytest.raises(ConfigError, match="do not divide"):
        MeshConfig(fsdp=3).resolve(8)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_mesh_from_the_command_line():
    config = load_train_config(
        None, ["model=m", "method=lora-r8", "output_dir=o", "mesh.fsdp=4", "mesh.data=2"]
    )
    assert config.mesh == MeshConfig(data=2, fsdp=4, tensor=1)
    with pytest.raises(ConfigError, match=r"mesh\.tensor"):
        load_train_config(
            None, ["model=m", "method=lora-r8", "output_dir=o", "mesh.tensor=0"]
        ).validate()

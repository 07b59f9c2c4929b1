"""ModelConfig: YAML round-trip, validation errors that name the field, HF config.json mapping."""

import dataclasses

import pytest
import yaml

from difflora_jax.catalog import model_names, model_shape
from difflora_jax.config import ModelConfig, RopeScaling, load_yaml, save_yaml, to_dict
from difflora_jax.errors import ConfigError
from tests import tiny

# The YAML these tests load: the required fields only (tests/tiny.py's shape), so every other
# field comes from its default unless a test sets it. A plain dict, not a ModelConfig, because
# the raw mapping (with wrong types, missing or unknown keys) is what load_yaml is tested on.
TINY = {
    field.name: getattr(tiny.TINY, field.name)
    for field in dataclasses.fields(ModelConfig)
    if field.default is dataclasses.MISSING
}


def _write(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------
# round-trip


@pytest.mark.parametrize("name", model_names())
def test_yaml_round_trip_of_known_shapes(tmp_path, name):
    config = model_shape(name)
    path = tmp_path / f"{name}.yaml"
    save_yaml(config, path)
    loaded = load_yaml(ModelConfig, path)
    assert loaded == config
    assert isinstance(loaded.eos_token_ids, tuple)
    if config.rope_scaling is not None:
        assert isinstance(loaded.rope_scaling, RopeScaling)


def test_yaml_round_trip_of_every_field(tmp_path):
    # A ModelConfig written out, not a tiny_config(...): this call is what the round trip checks.
    config = ModelConfig(
        **TINY,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        rope_freq_factors=(1.0, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 32.0),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_ids=(1, 7, 9),
        pad_token_id=3,
        name="tiny",
    )
    # every field differs from its default, so a field dropped on the way would show
    for field in dataclasses.fields(ModelConfig):
        if field.default is not dataclasses.MISSING:
            assert getattr(config, field.name) != field.default, field.name
    path = tmp_path / "tiny.yaml"
    save_yaml(config, path)
    loaded = load_yaml(ModelConfig, path)
    assert loaded == config
    assert isinstance(loaded.rope_freq_factors, tuple)
    assert yaml.safe_load(path.read_text()) == to_dict(config)


def test_yaml_integers_for_float_fields(tmp_path):
    path = _write(tmp_path, {**TINY, "rope_theta": 10000, "rms_norm_eps": 1})
    config = load_yaml(ModelConfig, path)
    assert isinstance(config.rope_theta, float) and config.rope_theta == 10000.0


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_field_names_field_and_allowed(tmp_path):
    path = _write(tmp_path, {**TINY, "num_experts": 8})
    with pytest.raises(ConfigError) as info:
        load_yaml(ModelConfig, path)
    message = str(info.value)
    assert "'num_experts'" in message
    assert "allowed fields" in message
    for field in dataclasses.fields(ModelConfig):
        assert field.name in message


def test_unknown_nested_field(tmp_path):
    path = _write(tmp_path, {**TINY, "rope_scaling": {"rope_type": "llama3", "beta_fast": 32}})
    with pytest.raises(ConfigError) as info:
        load_yaml(ModelConfig, path)
    message = str(info.value)
    assert "rope_scaling" in message and "'beta_fast'" in message
    assert "original_max_position_embeddings" in message  # an allowed field


def test_num_kv_heads_not_dividing_num_heads(tmp_path):
    path = _write(tmp_path, {**TINY, "num_heads": 9, "num_kv_heads": 4, "head_dim": 64})
    with pytest.raises(ConfigError) as info:
        load_yaml(ModelConfig, path)
    message = str(info.value)
    assert "'num_kv_heads' = 4" in message
    assert "num_heads (9)" in message
    with pytest.raises(ConfigError, match="'num_kv_heads'"):
        ModelConfig(**{**TINY, "num_kv_heads": 3}).validate()


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "default"])
def test_bad_rope_type(tmp_path, rope_type):
    path = _write(tmp_path, {**TINY, "rope_scaling": {"rope_type": rope_type}})
    with pytest.raises(ConfigError) as info:
        load_yaml(ModelConfig, path)
    message = str(info.value)
    assert f"rope_scaling.rope_type={rope_type!r}" in message
    assert "llama3" in message and "linear" in message  # the allowed values
    with pytest.raises(ConfigError, match="rope_type"):
        RopeScaling(rope_type=rope_type).validate()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 0}, "'hidden_size'"),
        ({"head_dim": 15}, "'head_dim'"),
        ({"rms_norm_eps": 0.0}, "'rms_norm_eps'"),
        ({"rope_theta": -1.0}, "'rope_theta'"),
        ({"rope_freq_factors": [1.0, 2.0]}, "'rope_freq_factors'"),
        (
            {"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 4.0}},
            "'rope_scaling.high_freq_factor'",
        ),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, "'rope_scaling.factor'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_out_of_range_values_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_yaml(ModelConfig, _write(tmp_path, {**TINY, **overrides}))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": "64"}, "'hidden_size'"),
        ({"num_layers": 2.0}, "'num_layers'"),
        ({"num_layers": True}, "'num_layers'"),
        ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings'"),
        ({"eos_token_ids": 2}, "'eos_token_ids'"),
        ({"rope_theta": "fast"}, "'rope_theta'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "two"}}, "'rope_scaling.factor'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_types_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_yaml(ModelConfig, _write(tmp_path, {**TINY, **overrides}))


def test_missing_required_field(tmp_path):
    data = dict(TINY)
    del data["head_dim"]
    with pytest.raises(ConfigError, match=r"missing required field.*'head_dim'"):
        load_yaml(ModelConfig, _write(tmp_path, data))


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(ModelConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(ModelConfig, bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(ModelConfig, listed)

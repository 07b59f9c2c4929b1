"""ModelConfig: YAML round-trip, validation errors that name the field, HF config.json mapping."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from difflora_jax.config import (
    SHAPES,
    ModelConfig,
    RopeScaling,
    load_yaml,
    model_config_from_hf,
    save_yaml,
    to_dict,
)
from difflora_jax.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def _write(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------
# round-trip


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_yaml_round_trip_of_known_shapes(tmp_path, name):
    config = SHAPES[name]
    path = tmp_path / f"{name}.yaml"
    save_yaml(config, path)
    loaded = load_yaml(ModelConfig, path)
    assert loaded == config
    assert isinstance(loaded.eos_token_ids, tuple)
    if config.rope_scaling is not None:
        assert isinstance(loaded.rope_scaling, RopeScaling)


def test_yaml_round_trip_of_every_field(tmp_path):
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


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_model_configs_match_shapes(path):
    config = load_yaml(ModelConfig, path)
    assert path.stem in SHAPES
    assert config == SHAPES[path.stem]


def test_smollm2_parameter_count():
    assert SHAPES["smollm2-135m"].num_params == 134515008


def test_num_params_matches_torch(tiny_llama):
    for tied in (True, False):
        _, model = tiny_llama(tie_word_embeddings=tied)
        config = model_config_from_hf(model.config.to_dict())
        # parameters() yields a tied weight once, as num_params counts it
        assert config.num_params == sum(p.numel() for p in model.parameters())


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
        ({"rope_theta": "1e4"}, "'rope_theta'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "'rope_scaling.factor'"),
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


# ---------------------------------------------------------------------------------------------
# HF config.json mapping (both the transformers 4 and 5 spellings of RoPE settings)


def _hf(**extra):
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        **extra,
    }


def test_hf_rope_scaling_transformers4_style():
    config = model_config_from_hf(
        _hf(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert config.head_dim == 16  # hidden_size / heads when head_dim is absent
    legacy = model_config_from_hf(_hf(rope_scaling={"type": "linear", "factor": 4.0}))
    assert legacy.rope_scaling.rope_type == "linear" and legacy.rope_scaling.factor == 4.0


def test_hf_rope_parameters_transformers5_style():
    config = model_config_from_hf(
        _hf(rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    )
    assert config.rope_theta == 123456.0 and config.rope_scaling is None
    scaled = model_config_from_hf(
        _hf(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    )
    assert scaled.rope_theta == 5000.0
    assert scaled.rope_scaling.rope_type == "linear" and scaled.rope_scaling.factor == 2.0


def test_hf_unsupported_rope_type_is_named():
    with pytest.raises(ConfigError, match="'yarn'"):
        model_config_from_hf(_hf(rope_parameters={"rope_type": "yarn", "factor": 4.0}))

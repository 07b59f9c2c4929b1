"""The Hugging Face Llama ``config.json`` <-> ModelConfig mapping, both directions, validated.

Reading checks every field it uses for type and range, so a ``config.json`` that is valid JSON
of the wrong shape (a list, a string where a number belongs, zero heads, a ``rope_scaling``
that is not an object) is a CheckpointError naming the file and the field, never a raw
``TypeError``. Writing checks that what it wrote reads back to the same model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from difflora_jax.config import ROPE_TYPES, ModelConfig, RopeScaling, to_dict
from difflora_jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM",)
_ABSENT = object()


def _field(hf: Mapping[str, Any], key: str, default: Any = _ABSENT) -> Any:
    value = hf.get(key, default)
    if value is _ABSENT:
        raise ConfigError(f"config.json lacks the required field {key!r}")
    return value


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config.json field {key!r} = {value!r} is invalid: expected {expected}")


def _int(hf: Mapping[str, Any], key: str, default: Any = _ABSENT, *, minimum: int = 1) -> Any:
    """An integer field >= ``minimum`` (None allowed only when it is the default)."""
    value = _field(hf, key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(key, value, f"an integer >= {minimum}")
    return value


def _float(hf: Mapping[str, Any], key: str, default: Any = _ABSENT, *, positive: bool = True):
    value = _field(hf, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, "a number")
    if positive and not value > 0:
        raise _bad(key, value, "a number > 0")
    return float(value)


def _bool(hf: Mapping[str, Any], key: str, default: bool) -> bool:
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(key, value, "true or false")
    return value


def _token_ids(hf: Mapping[str, Any], key: str) -> tuple[int, ...]:
    value = hf.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _bad(key, value, "a token id, a list of token ids, or null")
    return tuple(values)


def _optional_token_id(hf: Mapping[str, Any], key: str) -> int | None:
    ids = _token_ids(hf, key)
    if len(ids) > 1:
        raise _bad(key, hf.get(key), "one token id or null")
    return ids[0] if ids else None


def _check_architecture(hf: Mapping[str, Any]) -> None:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        raise _bad("architectures", archs, "a list of class names")
    model_type = hf.get("model_type")
    if model_type != "llama" and not any(a in SUPPORTED_HF_ARCHITECTURES for a in archs):
        raise ConfigError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
            f"difflora_jax supports Llama-family checkpoints (model_type 'llama', "
            f"{list(SUPPORTED_HF_ARCHITECTURES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if _bool(hf, flag, False):
            raise ConfigError(
                f"config.json sets {flag}=true; biased Llama variants are not supported"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}; only 'silu' is supported")


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, rope_scaling)``; transformers >= 5 writes them under ``rope_parameters``."""
    scaling = hf.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise _bad("rope_scaling", scaling, "an object or null")
    parameters = hf.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise _bad("rope_parameters", parameters, "an object or null")
    theta_source: Mapping[str, Any] = hf
    if parameters is not None:
        if "rope_theta" in parameters:
            theta_source = parameters
        if parameters.get("rope_type", "default") != "default":
            scaling = parameters
    theta = _float(theta_source, "rope_theta", 10000.0)
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"config.json rope_scaling type {rope_type!r} is not supported; "
            f"allowed: {list(ROPE_TYPES)}"
        )
    try:
        rope_scaling = RopeScaling(
            rope_type=rope_type,
            factor=_float(scaling, "factor", 1.0),
            low_freq_factor=_float(scaling, "low_freq_factor", 1.0),
            high_freq_factor=_float(scaling, "high_freq_factor", 4.0),
            original_max_position_embeddings=_int(
                scaling, "original_max_position_embeddings", 8192
            ),
        )
    except ConfigError as e:
        raise ConfigError(f"rope_scaling: {e}") from e
    return theta, rope_scaling


def model_config_from_hf(hf: Any, name: str = "") -> ModelConfig:
    """ModelConfig from the parsed ``config.json`` of a Hugging Face Llama checkpoint.

    ConfigError naming the field for anything of the wrong type, shape or range.
    """
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json: expected a JSON object, got {type(hf).__name__}")
    _check_architecture(hf)
    hidden = _int(hf, "hidden_size")
    num_heads = _int(hf, "num_attention_heads")
    head_dim = _int(hf, "head_dim", None)
    if head_dim is None:
        if hidden % num_heads:
            raise _bad(
                "num_attention_heads",
                num_heads,
                f"a divisor of hidden_size ({hidden}) when head_dim is not given",
            )
        head_dim = hidden // num_heads
    rope_theta, rope_scaling = _rope(hf)
    config = ModelConfig(
        name=name,
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(hf, "intermediate_size"),
        num_layers=_int(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=_int(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(hf, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_int(hf, "max_position_embeddings", 4096),
        tie_word_embeddings=_bool(hf, "tie_word_embeddings", False),
        bos_token_id=_optional_token_id(hf, "bos_token_id"),
        eos_token_ids=_token_ids(hf, "eos_token_id"),
        pad_token_id=_optional_token_id(hf, "pad_token_id"),
    )
    config.validate()
    return config


def read_hf_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory (its ``config.json``)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {CONFIG_FILE}; is it a Hugging Face model directory?"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    try:
        return model_config_from_hf(raw, name=directory.name)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def hf_llama_config(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face Llama ``config.json`` (float32 weights) describing ``config``.

    RoPE is written in the ``rope_theta`` / ``rope_scaling`` form, which transformers 4 (the
    reference DiffLoRA code) and 5 both read. Per-frequency factors of a GGUF file
    (``rope_freq_factors``) have no ``config.json`` form: a CheckpointError. The result is read
    back and compared with ``config``, so a field the mapping loses is an error, not a silently
    different model.
    """
    try:
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"cannot write a config.json for an invalid model config: {e}") from e
    if config.rope_freq_factors is not None:
        raise CheckpointError(
            "this base model carries per-frequency RoPE factors (rope_freqs of a GGUF file), "
            "which a Hugging Face config.json cannot express; use the model's Hugging Face "
            "directory as the base model"
        )
    eos = config.eos_token_ids
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else list(eos),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": "float32",
    }
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": rs.rope_type, "factor": rs.factor}
        if rs.rope_type == "llama3":
            hf["rope_scaling"].update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
    back = to_dict(model_config_from_hf(hf, name=config.name))
    differ = sorted(k for k, v in to_dict(config).items() if back[k] != v)
    if differ:
        raise CheckpointError(f"config.json mapping loses the field(s) {differ} of this model")
    return hf

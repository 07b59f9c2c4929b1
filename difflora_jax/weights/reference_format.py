"""DiffLoRA adapters in the format of the paper's public PyTorch code (alexmsrh/difflora).

That code's ``save_pretrained`` writes a directory with ``config.json`` (the base Llama config
plus its DiffLoRA fields, ``model_type: llama_lora_diff_transformer``, the base model's path in
``_name_or_path``) and ``model.safetensors`` holding only the trainable tensors, torch
``nn.Linear`` layout ``(out, in)``, for every layer in ``layers_to_transform``::

    model.layers.{i}.self_attn.wq_lora_A1.weight  (r, hidden)      positive term: Q1 = X W_Q + s X A1 B1
    model.layers.{i}.self_attn.wq_lora_B1.weight  (heads*d, r)
    model.layers.{i}.self_attn.wk_lora_A1.weight  (r, hidden)
    model.layers.{i}.self_attn.wk_lora_B1.weight  (kv_heads*d, r)
    model.layers.{i}.self_attn.wq_lora_A2 / B2, wk_lora_A2 / B2       negative-term adapters
    model.layers.{i}.self_attn.wq_2.weight        (heads*d, hidden)   full-matrix negative term
    model.layers.{i}.self_attn.wk_2.weight        (kv_heads*d, hidden)
    model.layers.{i}.self_attn.wv_lora_A / B.weight  (r, hidden) / (kv_heads*d, r)
    model.layers.{i}.self_attn.wo_lora_A / B.weight  (r, hidden) / (hidden, r)   parallel output branch
    model.layers.{i}.self_attn.lambda_q1, lambda_k1, lambda_q2, lambda_k2   (d,)   no ".weight"
    model.layers.{i}.self_attn.subln.weight       (d,)             group norm scale
    model.layers.{i}.mlp.{gate,up}_proj_lora_A / B.weight   (r, hidden) / (intermediate, r)
    model.layers.{i}.mlp.down_proj_lora_A / B.weight        (r, intermediate) / (hidden, r)

Config fields and our ``AdapterConfig``: ``attention_lora_r`` = rank, ``attention_lora_alpha``
= alpha (scale alpha / r: no rsLoRA), ``attention_lora_dropout`` = dropout, ``learn_lambda`` =
(lambda_mode == "learned"), ``diff_attn_lambda`` = lambda_init (learned: 0.0 means the schedule
0.8 - 0.6 exp(-0.3 layer); fixed: the constant), ``lora_negative_term_only`` = not
positive_term, ``negative_term_lora_only`` = (negative_term == "adapters"),
``negative_term_full_dim`` = (negative_term == "full"), both false = "base_plus_adapters",
``groupnorm`` = group_norm, ``lora_v``, ``lora_o``, ``lora_mlp``, ``relu_on_differential``,
``layers_to_transform`` = layers (that code builds differential attention only in those layers).
``diff_attn_init_with_base_weights`` is always true here (false would mean the adapters were
trained on re-initialised attention weights, which the file does not hold).

Not expressible, a CheckpointError naming the reason: LoRA (that code is DiffLoRA only; use
PEFT), rsLoRA, our ``identity_start`` (lambda = exp(q1.k1) - exp(q2.k2) + 0: that code reads
``diff_attn_lambda = 0`` as "use the schedule", adding 0.8 - 0.6 exp(-0.3 layer) to lambda and
so changing the function; a nonzero ``diff_attn_lambda`` near 0 would not be exact either),
per-layer fixed lambdas that differ between adapted layers (read only), and models whose
``heads * head_dim`` differs from ``hidden_size`` (that code sizes its adapters' inputs by
``heads * head_dim``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from difflora_jax.adapter_checkpoint import BASE_FIELDS
from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.errors import CheckpointError, ConfigError
from difflora_jax.weights.adapter_files import (
    adapter_layout,
    params_to_tensors,
    read_json,
    tensors_to_params,
    write_json,
)
from difflora_jax.weights.hf_config import hf_llama_config, model_config_from_hf
from difflora_jax.weights.layout import TensorMap
from difflora_jax.weights.safetensors_io import read_safetensors, write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "llama_lora_diff_transformer"
ARCHITECTURE = "LlamaLoraDiffTransformerForCausalLM"
# The reference config's constructor defaults (what that code uses for an absent field).
DEFAULTS: dict[str, Any] = {
    "diff_attn_implementation": "eager",
    "learn_lambda": False,
    "diff_attn_lambda": 0.0,
    "layers_to_transform": list(range(32)),
    "diff_attn_init_with_base_weights": True,
    "lora_negative_term_only": False,
    "negative_term_lora_only": False,
    "negative_term_full_dim": False,
    "attention_lora_alpha": 64,
    "attention_lora_r": 32,
    "attention_lora_dropout": 0.1,
    "lora_v": False,
    "lora_o": False,
    "lora_mlp": False,
    "groupnorm": True,
    "relu_on_differential": False,
}
_FLAGS = (
    "learn_lambda",
    "diff_attn_init_with_base_weights",
    "lora_negative_term_only",
    "negative_term_lora_only",
    "negative_term_full_dim",
    "lora_v",
    "lora_o",
    "lora_mlp",
    "groupnorm",
    "relu_on_differential",
)
# our LowRank module inside the attention -> the reference's name pattern ({} = A or B)
_ATTENTION_LOWRANK = {
    "q_proj.lora": "wq_lora_{}1",
    "k_proj.lora": "wk_lora_{}1",
    "negative_q": "wq_lora_{}2",
    "negative_k": "wk_lora_{}2",
    "v_proj.lora": "wv_lora_{}",
    "output_branch": "wo_lora_{}",
}
_FULL = {"negative_q": "wq_2", "negative_k": "wk_2"}
_VECTORS = {
    "lambda_q1": "lambda_q1",
    "lambda_k1": "lambda_k1",
    "lambda_q2": "lambda_q2",
    "lambda_k2": "lambda_k2",
    "group_norm": "subln.weight",
}
# ModelConfig fields a reference config.json carries and that must match the base model: those
# a checkpoint's base record compares, less the GGUF-only RoPE factors (config.json has no field)
_BASE_FIELDS = tuple(f for f in BASE_FIELDS if f != "rope_freq_factors")


def reference_name(path: str) -> str:
    """Our adapter path -> the reference code's tensor name (``model.layers.{i}.self_attn...``)."""
    parts = path.split(".")
    if len(parts) < 4 or parts[0] != "layers":
        raise CheckpointError(f"adapter parameter {path!r} has no reference-format counterpart")
    layer, block, rest = parts[1], parts[2], parts[3:]
    name = None
    if block == "attn":
        leaf, module = rest[-1], ".".join(rest[:-1])
        if len(rest) == 1 and leaf in _VECTORS:
            name = _VECTORS[leaf]
        elif leaf == "kernel" and module in _FULL:
            name = f"{_FULL[module]}.weight"
        elif leaf in ("a", "b") and module in _ATTENTION_LOWRANK:
            name = _ATTENTION_LOWRANK[module].format(leaf.upper()) + ".weight"
        block = "self_attn"
    elif block == "mlp" and len(rest) == 3 and rest[1] == "lora" and rest[2] in ("a", "b"):
        if rest[0] in ("gate_proj", "up_proj", "down_proj"):
            name = f"{rest[0]}_lora_{rest[2].upper()}.weight"
    if name is None:
        raise CheckpointError(f"adapter parameter {path!r} has no reference-format counterpart")
    return f"model.layers.{layer}.{block}.{name}"


def check_expressible(adapter: AdapterConfig, model_config: ModelConfig) -> None:
    """CheckpointError unless the reference format can hold ``adapter`` exactly."""
    if adapter.method != "difflora":
        raise CheckpointError(
            f"the reference DiffLoRA format holds DiffLoRA adapters only; this adapter is "
            f"{adapter.method!r}: export LoRA with --format peft (or --format merged)"
        )
    if adapter.use_rslora:
        raise CheckpointError(
            "the reference DiffLoRA format always scales adapters by alpha / r; this adapter "
            "uses rsLoRA (alpha / sqrt(r)), which it cannot express"
        )
    if adapter.identity_start:
        raise CheckpointError(
            "the reference DiffLoRA format cannot express identity_start: our lambda is "
            "exp(q1.k1) - exp(q2.k2) + 0, but that code reads diff_attn_lambda = 0 as 'use "
            "the schedule' and adds lambda_init = 0.8 - 0.6 exp(-0.3 layer), which changes "
            "the function (and a small nonzero diff_attn_lambda is not exact either); keep "
            "the adapter checkpoint, or train with a schedule or nonzero lambda_init"
        )
    c = model_config
    if c.num_heads * c.head_dim != c.hidden_size:
        raise CheckpointError(
            f"the reference DiffLoRA code sizes its adapters' inputs by heads * head_dim "
            f"({c.num_heads} * {c.head_dim} = {c.num_heads * c.head_dim}), which differs from "
            f"this model's hidden_size {c.hidden_size}: it cannot hold these adapters"
        )


def reference_layout(model_config: ModelConfig, adapter: AdapterConfig) -> dict[str, TensorMap]:
    """``{our path: TensorMap}`` of every trainable parameter, with the reference names."""
    check_expressible(adapter, model_config)
    return adapter_layout(model_config, adapter, reference_name)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def reference_config(
    adapter: AdapterConfig, model_config: ModelConfig, base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The ``config.json`` of ``adapter``: the base Llama config plus the reference fields."""
    check_expressible(adapter, model_config)
    learned = adapter.lambda_mode == "learned"
    if learned:
        # 0.0: the schedule, as in lambda_init_for (None and 0 both mean it when learned)
        lam = 0.0 if adapter.lambda_init is None else float(adapter.lambda_init)
    else:
        if adapter.lambda_init is None:  # AdapterConfig.validate refuses this too
            raise CheckpointError("a fixed lambda (lambda_mode 'fixed') needs lambda_init")
        lam = float(adapter.lambda_init)
    config = hf_llama_config(model_config)
    config.update(
        architectures=[ARCHITECTURE],
        model_type=MODEL_TYPE,
        _name_or_path=base_model_name_or_path or "",
        diff_attn_implementation="eager",
        learn_lambda=learned,
        diff_attn_lambda=lam,
        layers_to_transform=list(adapter.adapted_layers(model_config.num_layers)),
        diff_attn_init_with_base_weights=True,
        lora_negative_term_only=not adapter.positive_term,
        negative_term_lora_only=adapter.negative_term == "adapters",
        negative_term_full_dim=adapter.negative_term == "full",
        attention_lora_alpha=_number(adapter.alpha),
        attention_lora_r=adapter.rank,
        attention_lora_dropout=float(adapter.dropout),
        lora_v=adapter.lora_v,
        lora_o=adapter.lora_o,
        lora_mlp=adapter.lora_mlp,
        groupnorm=adapter.group_norm,
        relu_on_differential=adapter.relu_on_differential,
        fa_deterministic_backward=False,
        verbose=False,
    )
    return config


def model_config_from_reference(data: Mapping[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    """The base Llama ModelConfig a reference ``config.json`` carries."""
    hf = dict(data)
    hf["model_type"] = "llama"
    hf["architectures"] = ["LlamaForCausalLM"]
    try:
        return model_config_from_hf(hf)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def check_base_config(file_config: ModelConfig, model_config: ModelConfig, where: str) -> None:
    """CheckpointError unless the base model has the shape configuration the file records."""
    differ = [
        f"{f}: {getattr(file_config, f)!r} vs {getattr(model_config, f)!r}"
        for f in _BASE_FIELDS
        if getattr(file_config, f) != getattr(model_config, f)
    ]
    if differ:
        raise CheckpointError(
            f"{where} was saved for a different base model than the one given: "
            f"{', '.join(differ)} (file vs base model)"
        )


def _flag(data: Mapping[str, Any], field: str, where: str) -> bool:
    value = data.get(field, DEFAULTS[field])
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {field}={value!r}; expected true or false")
    return value


def _number_field(data: Mapping[str, Any], field: str, where: str) -> float:
    value = data.get(field, DEFAULTS[field])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where}: {field}={value!r}; expected a number")
    return value


def _reference_flags(data: Mapping[str, Any], where: str) -> dict[str, bool]:
    """The reference config's boolean fields (``_FLAGS``), refusing what we cannot express."""
    known = set(DEFAULTS) - {"diff_attn_implementation"}
    if data.get("model_type") != MODEL_TYPE and not known & set(data):
        raise CheckpointError(
            f"{where} is not a reference DiffLoRA config: model_type={data.get('model_type')!r} "
            f"(expected {MODEL_TYPE!r}) and none of its fields ({sorted(known)})"
        )
    flags = {field: _flag(data, field, where) for field in _FLAGS}
    if not flags["diff_attn_init_with_base_weights"]:
        raise CheckpointError(
            f"{where}: diff_attn_init_with_base_weights=false: the adapters were trained on "
            "re-initialised attention weights, which the file does not hold"
        )
    if flags["negative_term_lora_only"] and flags["negative_term_full_dim"]:
        raise CheckpointError(
            f"{where}: negative_term_lora_only and negative_term_full_dim are both true "
            "(the reference code refuses this too)"
        )
    return flags


def _reference_rank(data: Mapping[str, Any], where: str) -> int:
    rank = data.get("attention_lora_r", DEFAULTS["attention_lora_r"])
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CheckpointError(f"{where}: attention_lora_r={rank!r}; expected a positive integer")
    return rank


def _reference_layers(data: Mapping[str, Any], num_layers: int, where: str) -> list[int]:
    """The adapted layers, sorted: that code adapts layer i when ``i in layers_to_transform``,
    so indices outside the model are ignored."""
    layers = data.get("layers_to_transform", DEFAULTS["layers_to_transform"])
    if not isinstance(layers, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise CheckpointError(f"{where}: layers_to_transform={layers!r}; expected layer indices")
    adapted = sorted({i for i in layers if 0 <= i < num_layers})
    if not adapted:
        raise CheckpointError(
            f"{where}: layers_to_transform={layers!r} names none of the model's {num_layers} layers"
        )
    return adapted


def _reference_lambda(
    data: Mapping[str, Any], learned: bool, adapted: list[int], num_layers: int, where: str
) -> tuple[str, float | None]:
    """``(lambda_mode, lambda_init)`` of ``diff_attn_lambda``: learned (0 means the schedule,
    our None), or one fixed constant (a per-layer list must agree on the adapted layers)."""
    lam = data.get("diff_attn_lambda", DEFAULTS["diff_attn_lambda"])
    if learned:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise CheckpointError(
                f"{where}: diff_attn_lambda={lam!r} with learn_lambda; expected one number "
                "(the reference code fails on a list when lambda is learned)"
            )
        return "learned", (None if lam == 0 else float(lam))
    if isinstance(lam, list):
        if len(lam) != num_layers:
            raise CheckpointError(
                f"{where}: diff_attn_lambda lists {len(lam)} values for {num_layers} layers"
            )
        values = {lam[i] for i in adapted}
        if len(values) != 1:
            raise CheckpointError(
                f"{where}: diff_attn_lambda gives the adapted layers different fixed "
                f"lambdas {sorted(values)}; our fixed lambda is one constant"
            )
        lam = values.pop()
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise CheckpointError(f"{where}: diff_attn_lambda={lam!r}; expected a number")
    return "fixed", float(lam)


def _reference_negative_term(flags: Mapping[str, bool]) -> str:
    if flags["negative_term_full_dim"]:
        return "full"
    if flags["negative_term_lora_only"]:
        return "adapters"
    return "base_plus_adapters"


def adapter_config_from_reference(
    data: Mapping[str, Any], num_layers: int, where: str = CONFIG_FILE
) -> AdapterConfig:
    """Our AdapterConfig of a reference ``config.json`` (absent fields take that code's
    defaults); a CheckpointError naming the field for what we cannot express."""
    flags = _reference_flags(data, where)
    rank = _reference_rank(data, where)
    alpha = _number_field(data, "attention_lora_alpha", where)
    dropout = _number_field(data, "attention_lora_dropout", where)
    adapted = _reference_layers(data, num_layers, where)
    lambda_mode, lambda_init = _reference_lambda(
        data, flags["learn_lambda"], adapted, num_layers, where
    )
    try:
        adapter = AdapterConfig(
            method="difflora",
            rank=rank,
            alpha=float(alpha),
            dropout=float(dropout),
            layers=None if adapted == list(range(num_layers)) else tuple(adapted),
            positive_term=not flags["lora_negative_term_only"],
            negative_term=_reference_negative_term(flags),
            lambda_mode=lambda_mode,
            lambda_init=lambda_init,
            group_norm=flags["groupnorm"],
            lora_v=flags["lora_v"],
            lora_o=flags["lora_o"],
            lora_mlp=flags["lora_mlp"],
            relu_on_differential=flags["relu_on_differential"],
        )
        adapter.validate()
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e
    return adapter


def write_reference(
    directory: Path,
    model_config: ModelConfig,
    adapter: AdapterConfig,
    params: Mapping[str, np.ndarray],
    base_model_name_or_path: str | None = None,
) -> dict[str, np.ndarray]:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``; returns the tensors."""
    tensors = params_to_tensors(reference_layout(model_config, adapter), params)
    config = reference_config(adapter, model_config, base_model_name_or_path)
    write_safetensors(directory / WEIGHTS_FILE, tensors)
    write_json(directory / CONFIG_FILE, config)
    return tensors


def read_reference_config(directory: Path) -> dict[str, Any]:
    return read_json(directory / CONFIG_FILE, "a reference DiffLoRA directory")


def read_reference(
    directory: Path, model_config: ModelConfig
) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """``(adapter config, our flat float32 adapters)`` of a reference-format directory; the
    base config it records must match ``model_config`` and every tensor must fit."""
    data = read_reference_config(directory)
    where = str(directory / CONFIG_FILE)
    check_base_config(model_config_from_reference(data, where), model_config, where)
    adapter = adapter_config_from_reference(data, model_config.num_layers, where)
    layout = reference_layout(model_config, adapter)
    tensors = read_safetensors(directory / WEIGHTS_FILE, "a reference DiffLoRA directory")
    expectation = (
        f"the DiffLoRA adapters its config describes (rank {adapter.rank}, negative_term "
        f"{adapter.negative_term!r}, lambda {adapter.lambda_mode}) on this base model"
    )
    params = tensors_to_params(
        layout, tensors, str(directory / WEIGHTS_FILE), expectation=expectation
    )
    return adapter, params

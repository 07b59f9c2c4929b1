"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` plus
``adapter_model.safetensors``.

Tensor names are PEFT's for a ``LlamaForCausalLM`` wrapped by ``get_peft_model``, without the
adapter name, in torch ``nn.Linear`` layout::

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out, r)
    ... self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj

Our LowRank ``a`` ``[*in, r]`` is ``lora_A`` transposed (in flattened), ``b`` ``[r, *out]`` is
``lora_B`` transposed. PEFT's scale is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``),
ours too. Only standard LoRA (``method: lora``) has this form; DiffLoRA uses the reference
format (``weights/reference_format.py``).

Reading accepts what PEFT writes for LoRA on the seven Llama projections (``target_modules`` as
names or module paths, which PEFT matches as suffixes, a regular expression, or
``"all-linear"``; ``layers_to_transform``) when it puts the same projections in every adapted
layer, and refuses, naming the field, what our LoRA cannot express: DoRA, biases,
``rank_pattern`` / ``alpha_pattern``, ``modules_to_save``, initialisations that rewrite the
base weights (PiSSA, OLoRA, CorDA, LoftQ), other PEFT types.
``base_model_name_or_path`` is informational: tensor shapes are what is checked against the
base model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from difflora_jax.config import LORA_TARGETS, AdapterConfig, ModelConfig, from_dict
from difflora_jax.errors import CheckpointError, ConfigError
from difflora_jax.modeling.adapters import LORA_TARGET_MODULES
from difflora_jax.weights.adapter_files import (
    adapter_layout,
    params_to_tensors,
    read_json,
    tensors_to_params,
    write_json,
)
from difflora_jax.weights.layout import TensorMap
from difflora_jax.weights.safetensors_io import read_safetensors, write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers."
# transformers' name of a block inside a Llama layer, where ours differs
_TORCH_BLOCK = {"attn": "self_attn"}
# our target name -> (our module path inside a layer, the torch module path inside a layer)
MODULES = {
    target: (f"{block}.{name}", f"{_TORCH_BLOCK.get(block, block)}.{name}")
    for target, (block, name) in LORA_TARGET_MODULES.items()
}
_TORCH_OF_OURS = {ours: torch for ours, torch in MODULES.values()}
# init_lora_weights values that only choose a starting point (anything else, e.g. "pissa",
# rewrites the base weights, which an adapter file alone does not carry)
_INIT_ONLY = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "eva": "kaiming"}
# fields that must be empty / false for a plain LoRA on the base weights
_MUST_BE_OFF = (
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layer_replication",
    "lora_bias",
    "exclude_modules",
    "trainable_token_indices",
    "target_parameters",
    "fan_in_fan_out",
    "megatron_config",
    "use_qalora",
)


def peft_name(path: str) -> str:
    """``layers.3.attn.q_proj.lora.a`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""
    parts = path.split(".")
    module = ".".join(parts[2:4])
    if (
        len(parts) != 6
        or parts[0] != "layers"
        or parts[4] != "lora"
        or module not in _TORCH_OF_OURS
    ):
        raise CheckpointError(f"adapter parameter {path!r} has no PEFT LoRA counterpart")
    matrix = {"a": "lora_A", "b": "lora_B"}[parts[5]]
    return f"{PREFIX}{parts[1]}.{_TORCH_OF_OURS[module]}.{matrix}.weight"


def check_expressible(adapter: AdapterConfig) -> None:
    if adapter.method != "lora":
        raise CheckpointError(
            f"the PEFT format holds standard LoRA adapters; this adapter is {adapter.method!r} "
            "(differential attention has no PEFT form): export DiffLoRA with --format reference"
        )


def peft_layout(model_config: ModelConfig, adapter: AdapterConfig) -> dict[str, TensorMap]:
    """``{our path: TensorMap}`` of every LoRA parameter, with PEFT's tensor names."""
    check_expressible(adapter)
    return adapter_layout(model_config, adapter, peft_name)


def peft_config(adapter: AdapterConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of ``adapter`` (fields of PEFT's ``LoraConfig``)."""
    check_expressible(adapter)
    alpha = int(adapter.alpha) if float(adapter.alpha).is_integer() else adapter.alpha
    layers = None if adapter.layers is None else sorted(set(adapter.layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": adapter.rank,
        "lora_alpha": alpha,
        "lora_dropout": adapter.dropout,
        "use_rslora": adapter.use_rslora,
        "target_modules": sorted(MODULES[t][1].split(".")[1] for t in set(adapter.targets)),
        "layers_to_transform": layers,
        "layers_pattern": None if layers is None else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if adapter.init == "gaussian" else True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _module_key(i: int, target: str) -> str:
    """The torch module path of ``target`` in layer ``i``: ``model.layers.3.self_attn.q_proj``."""
    return f"model.layers.{i}.{MODULES[target][1]}"


def _selected_modules(value: Any, num_layers: int, where: str) -> set[tuple[int, str]]:
    """The ``(layer, target)`` pairs PEFT's ``target_modules`` selects: names matched as
    suffixes of module paths, a regular expression matched against the whole path, or
    ``"all-linear"``."""
    keys = [(i, t) for i in range(num_layers) for t in MODULES]
    if value == "all-linear":  # PEFT: every linear layer but the output head
        return set(keys)
    if isinstance(value, str):
        try:
            pattern = re.compile(value)
        except re.error as e:
            raise CheckpointError(f"{where}: target_modules={value!r} is not a regex: {e}") from e
        return {(i, t) for i, t in keys if pattern.fullmatch(_module_key(i, t))}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        chosen: set[tuple[int, str]] = set()
        for entry in value:
            found = {
                (i, t)
                for i, t in keys
                if _module_key(i, t) == entry or _module_key(i, t).endswith("." + entry)
            }
            if not found:
                raise CheckpointError(
                    f"{where}: target_modules names {entry!r}, which is none of the Llama "
                    f"projections {sorted(m.split('.')[1] for _, m in MODULES.values())} of "
                    f"this {num_layers}-layer model; only they carry our LoRA adapters"
                )
            chosen |= found
        return chosen
    raise CheckpointError(
        f"{where}: target_modules={value!r}; expected module names, a regular expression "
        "or 'all-linear'"
    )


def _module_targets(
    value: Any, layers: list[int] | None, num_layers: int, where: str
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(targets, adapted layers)`` of PEFT's ``target_modules`` (see ``_selected_modules``)
    and ``layers_to_transform``."""
    chosen = _selected_modules(value, num_layers, where)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise CheckpointError(
                f"{where}: layers_to_transform names layers {bad}; this model has {num_layers}"
            )
        chosen = {(i, t) for i, t in chosen if i in layers}
    per_layer: dict[int, set[str]] = {}
    for i, t in chosen:
        per_layer.setdefault(i, set()).add(t)
    if not per_layer:
        raise CheckpointError(
            f"{where}: target_modules={value!r} with layers_to_transform={layers!r} selects no "
            "projection of this model"
        )
    target_sets = {frozenset(ts) for ts in per_layer.values()}
    if len(target_sets) != 1:
        raise CheckpointError(
            f"{where}: target_modules selects different projections in different layers "
            f"({ {i: sorted(ts) for i, ts in sorted(per_layer.items())} }); our LoRA puts one "
            "set of targets on every adapted layer"
        )
    (target_set,) = target_sets
    targets = tuple(t for t in LORA_TARGETS if t in target_set)
    return targets, tuple(sorted(per_layer))


def _check_plain_lora(data: Mapping[str, Any], where: str) -> None:
    """CheckpointError unless ``data`` is a causal-LM LoRA without PEFT's extras (DoRA,
    biases, patterns, saved modules...)."""
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{where}: peft_type={peft_type!r}; only 'LORA' adapters import")
    task_type = data.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise CheckpointError(
            f"{where}: task_type={task_type!r}; only causal-LM adapters ('CAUSAL_LM') import"
        )
    for field in _MUST_BE_OFF:
        if data.get(field):
            raise CheckpointError(
                f"{where}: {field}={data[field]!r} is not supported (our LoRA is a plain "
                "low-rank update of the seven Llama projections)"
            )
    if data.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias={data['bias']!r}; only bias='none' is supported")


def _peft_layers(data: Mapping[str, Any], where: str) -> list[int] | None:
    """``layers_to_transform`` as a list of layer indices (None: every layer)."""
    pattern = data.get("layers_pattern")
    if pattern not in (None, "layers", ["layers"]):
        raise CheckpointError(
            f"{where}: layers_pattern={pattern!r}; a Llama's decoder layers are 'layers'"
        )
    layers = data.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise CheckpointError(f"{where}: layers_to_transform={layers!r}; expected layer indices")
    return layers


def adapter_config_from_peft(
    data: Mapping[str, Any], num_layers: int, where: str = CONFIG_FILE
) -> AdapterConfig:
    """Our AdapterConfig of a PEFT ``adapter_config.json`` for a base model of ``num_layers``
    layers; a CheckpointError naming the field for anything our LoRA cannot express."""
    _check_plain_lora(data, where)
    init = data.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in _INIT_ONLY:
        raise CheckpointError(
            f"{where}: init_lora_weights={init!r} is not supported: it changes the base "
            "weights, which the adapter file does not carry (convert the adapter to plain LoRA "
            "with PEFT first)"
        )
    layers = _peft_layers(data, where)
    for field in ("r", "lora_alpha"):
        if field not in data:
            raise CheckpointError(f"{where} lacks the field {field!r}")
    targets, adapted = _module_targets(data.get("target_modules"), layers, num_layers, where)
    fields = dict(
        method="lora",
        rank=data["r"],
        alpha=data["lora_alpha"],
        dropout=data.get("lora_dropout", 0.0),
        use_rslora=data.get("use_rslora", False),
        init=_INIT_ONLY[init],
        layers=None if adapted == tuple(range(num_layers)) else adapted,
        targets=targets,
    )
    try:
        return from_dict(AdapterConfig, fields, where=where)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def write_peft(
    directory: Path,
    model_config: ModelConfig,
    adapter: AdapterConfig,
    params: Mapping[str, np.ndarray],
    base_model_name_or_path: str | None = None,
) -> dict[str, np.ndarray]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``;
    returns the tensors written."""
    tensors = params_to_tensors(peft_layout(model_config, adapter), params)
    write_safetensors(directory / WEIGHTS_FILE, tensors)
    write_json(directory / CONFIG_FILE, peft_config(adapter, base_model_name_or_path))
    return tensors


def read_peft_config(directory: Path) -> dict[str, Any]:
    return read_json(directory / CONFIG_FILE, "a PEFT adapter directory")


def read_peft(
    directory: Path, model_config: ModelConfig
) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """``(adapter config, our flat float32 adapters)`` of a PEFT LoRA directory, every tensor
    checked against ``model_config`` (the base model's shapes)."""
    data = read_peft_config(directory)
    where = str(directory / CONFIG_FILE)
    adapter = adapter_config_from_peft(data, model_config.num_layers, where)
    tensors = read_safetensors(directory / WEIGHTS_FILE, "a PEFT adapter directory")
    layout = peft_layout(model_config, adapter)
    expectation = (
        f"a rank-{adapter.rank} LoRA on {list(adapter.targets)} of this base model "
        f"(hidden {model_config.hidden_size}, {model_config.num_layers} layers)"
    )
    params = tensors_to_params(
        layout, tensors, str(directory / WEIGHTS_FILE), expectation=expectation
    )
    return adapter, params

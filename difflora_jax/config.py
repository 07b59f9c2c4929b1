"""The config machinery (frozen dataclasses, validation, dict/YAML round-trip) and the two
configs every layer above needs: ModelConfig (the shape of a Llama-family model) and
AdapterConfig (which adapters it gets).

``from_dict`` rejects unknown fields and names the allowed ones; ``validate`` names the bad
field and its allowed values. Training configs live beside the trainer
(``difflora_jax.training.config``); the Hugging Face ``config.json`` mapping beside the weight
readers (``difflora_jax.weights.hf_config``); named models and methods in ``catalog``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from difflora_jax.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as in HF ``rope_scaling`` (``llama3`` for Llama 3.1 / 3.2, or ``linear``)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self) -> None:
        if self.rope_type not in ROPE_TYPES[1:]:
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; allowed: "
                f"{list(ROPE_TYPES[1:])} (or no rope_scaling for the default RoPE)"
            )
        check_field(self.factor > 0, "rope_scaling.factor", self.factor, "> 0")
        if self.rope_type == "llama3":
            check_field(
                self.high_freq_factor > self.low_freq_factor,
                "rope_scaling.high_freq_factor",
                self.high_freq_factor,
                f"> low_freq_factor ({self.low_freq_factor})",
            )
            check_field(
                self.original_max_position_embeddings > 0,
                "rope_scaling.original_max_position_embeddings",
                self.original_max_position_embeddings,
                "> 0",
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2 / 3 / 3.1 / 3.2, SmolLM2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors of the RoPE inverse frequencies, as GGUF files of Llama 3.x carry them
    # (tensor ``rope_freqs.weight``) instead of the ``rope_scaling`` parameters.
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""

    def validate(self) -> None:
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            check_field(isinstance(value, int) and value > 0, field, value, "a positive integer")
        check_field(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"a divisor of num_heads ({self.num_heads})",
        )
        check_field(self.head_dim % 2 == 0, "head_dim", self.head_dim, "even (RoPE rotates pairs)")
        check_field(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        check_field(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        if self.rope_freq_factors is not None:
            check_field(
                len(self.rope_freq_factors) == self.head_dim // 2,
                "rope_freq_factors",
                f"{len(self.rope_freq_factors)} values",
                f"head_dim / 2 = {self.head_dim // 2} values",
            )

    @property
    def num_params(self) -> int:
        """Number of base-model parameters (the tied LM head counted once)."""
        e, h, kv, d, m, v = (
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size,
        )
        attention = e * h * d * 2 + e * kv * d * 2
        per_layer = attention + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else v * e
        return v * e + self.num_layers * per_layer + e + head


ADAPTER_METHODS = ("lora", "difflora")
# How adapter-dropout masks are drawn, the default first (modeling/dropout.py). "hash": a
# counter hash of each element's index keyed by two words drawn from a threefry2x32 key (the
# same i.i.d. Bernoulli dropout as PEFT's, in distribution, and tested for it); "threefry2x32"
# and "rbg": jax.random.bernoulli with keys of that implementation (nnx.Dropout's masks).
# In the scanned SmolLM2-135M LoRA r8 step at 4 x 512 on a 2-core AMD EPYC, dropout by
# threefry2x32 cost 1.4 s of a 13 s step and 5 s of its 30 s first call (timed against
# dropout 0 with bench.train.jax_runner, 2026-11-29); rbg was slower than threefry2x32.
DROPOUT_PRNGS = ("hash", "threefry2x32", "rbg")
# What a decoder layer keeps for the backward pass (modeling.llama.REMAT): everything
# ("none"), only its input ("full"), or the outputs of its matmuls ("dots_saveable"), of the
# matmuls without a batch dimension, i.e. the projections but not the attention maps
# ("dots_with_no_batch_dims_saveable").
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
NEGATIVE_TERMS = ("adapters", "base_plus_adapters", "full")
LAMBDA_MODES = ("learned", "fixed")
ADAPTER_INITS = ("kaiming", "gaussian")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which adapters a model gets: standard LoRA, or DiffLoRA in any of the paper's variants.

    LoRA (``method: lora``) follows PEFT: ``targets`` among q, k, v, o, gate, up, down; scale
    ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``); A kaiming-uniform (or
    gaussian, std 1/rank), B zero.

    DiffLoRA (``method: difflora``) makes every adapted layer's attention differential:
    ``(softmax(Q1 K1^T) - lambda softmax(Q2 K2^T)) V``. ``positive_term`` adds adapters to
    Q1, K1; ``negative_term`` is ``adapters`` (Q2 = s X A2 B2, B2 kaiming too),
    ``base_plus_adapters`` (Q2 = X W_Q + s X A2 B2, the reference code's default) or ``full``
    (a trainable dense W_Q2). ``lambda_mode: learned`` uses the exp reparameterisation around
    ``lambda_init`` (None: 0.8 - 0.6 exp(-0.3 layer)); ``fixed`` keeps lambda = ``lambda_init``.
    ``group_norm`` RMS-normalises each head and scales by (1 - lambda_init). ``lora_v`` and
    ``lora_mlp`` add standard adapters to V and the MLP; ``lora_o`` is the reference code's
    parallel output branch, which reads the layer input X (not the attention output).
    ``identity_start`` is our function-preserving start: lambda = 0 exactly at step 0.
    """

    method: str = "difflora"
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    layers: tuple[int, ...] | None = None
    targets: tuple[str, ...] = LORA_TARGETS
    positive_term: bool = True
    negative_term: str = "base_plus_adapters"
    lambda_mode: str = "learned"
    lambda_init: float | None = None
    group_norm: bool = False
    lora_v: bool = False
    lora_o: bool = False
    lora_mlp: bool = False
    relu_on_differential: bool = False
    identity_start: bool = False
    seed: int = 0

    @property
    def scale(self) -> float:
        """The adapter scale s: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def lambda_init_for(self, layer_index: int) -> float:
        """lambda_init of one layer: the configured value, 0 for identity_start, or the schedule."""
        if self.identity_start:
            return 0.0
        if self.lambda_init is not None and (self.lambda_mode == "fixed" or self.lambda_init != 0):
            return float(self.lambda_init)
        return 0.8 - 0.6 * math.exp(-0.3 * layer_index)

    def validate(self) -> None:
        check_choice("method", self.method, ADAPTER_METHODS)
        check_choice("init", self.init, ADAPTER_INITS)
        check_choice("negative_term", self.negative_term, NEGATIVE_TERMS)
        check_choice("lambda_mode", self.lambda_mode, LAMBDA_MODES)
        check_field(
            isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "a positive integer"
        )
        check_field(self.alpha > 0, "alpha", self.alpha, "> 0")
        check_field(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        for target in self.targets:
            check_choice("targets", target, LORA_TARGETS)
        if self.layers is not None:
            check_field(
                len(self.layers) > 0 and all(i >= 0 for i in self.layers),
                "layers",
                self.layers,
                "a non-empty list of layer indices >= 0 (or null for all layers)",
            )
        if self.lambda_mode == "fixed":
            check_field(
                self.lambda_init is not None,
                "lambda_init",
                self.lambda_init,
                "set to the constant lambda when lambda_mode is 'fixed' (the paper uses 0.1)",
            )
        if self.identity_start:
            check_field(
                self.lambda_mode == "learned",
                "lambda_mode",
                self.lambda_mode,
                "'learned' with identity_start (lambda starts at 0 and must be able to move)",
            )
            check_field(
                not self.group_norm,
                "group_norm",
                self.group_norm,
                "false with identity_start (group norm changes the output at step 0)",
            )
            check_field(
                not self.relu_on_differential,
                "relu_on_differential",
                self.relu_on_differential,
                "false with identity_start (ReLU changes the output at step 0)",
            )
            check_field(
                self.lambda_init in (None, 0.0),
                "lambda_init",
                self.lambda_init,
                "null or 0 with identity_start (lambda starts at exactly 0)",
            )

    def check_model(self, config: ModelConfig) -> None:
        """Errors for a method that does not fit the model (e.g. a layer index out of range)."""
        if self.layers is not None:
            bad = [i for i in self.layers if i >= config.num_layers]
            check_field(
                not bad, "layers", self.layers, f"indices below num_layers ({config.num_layers})"
            )

    def adapted_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else tuple(sorted(set(self.layers)))


def check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    """ConfigError naming ``field``, its ``value`` and the allowed values, unless allowed."""
    if value not in allowed:
        raise ConfigError(
            f"config field {field!r} = {value!r} is invalid: allowed values {list(allowed)}"
        )


def check_field(ok: bool, field: str, value: Any, allowed: str) -> None:
    """ConfigError naming ``field``, its ``value`` and what it must be, unless ``ok``."""
    if not ok:
        raise ConfigError(f"config field {field!r} = {value!r} is invalid: must be {allowed}")


# ---------------------------------------------------------------------------------------------
# dict / YAML round-trip shared by every config dataclass


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (lists for tuples) of a config dataclass, for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def from_dict(cls: type[T], data: object, where: str = "") -> T:
    """Build dataclass ``cls`` from a dict, converting nested dataclasses and tuples.

    Unknown keys raise a ConfigError naming the key and the allowed fields; a wrong type names the
    field and the expected type.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown field(s) {unknown}; allowed fields: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(
            hints[name], value, f"{where}{name}" if not where else f"{where}.{name}"
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required field(s) {missing}")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _convert(hint: Any, value: Any, field: str) -> Any:
    """``value`` converted to type ``hint`` (a field's annotation), or a ConfigError naming ``field``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, field)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, field)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {field!r} = {value!r}: expected a list")
        item = args[0] if args else Any
        return tuple(_convert(item, v, field) for v in value)
    return _convert_scalar(hint, value, field)


def _convert_union(args: tuple[Any, ...], value: Any, field: str) -> Any:
    """``value`` as the first member of the union ``args`` that accepts it (None if optional)."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, field)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"config field {field!r}: bad value {value!r}")


def _convert_scalar(hint: Any, value: Any, field: str) -> Any:
    """``value`` checked as a float (YAML number strings accepted), int, bool or str ``hint``."""
    if hint is float:
        if isinstance(value, str):
            value = yaml_number(value)  # PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field {field!r} = {value!r}: expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field {field!r} = {value!r}: expected an integer")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field {field!r} = {value!r}: expected true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field {field!r} = {value!r}: expected a string")
        return value
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def yaml_number(text: str) -> Any:
    """``float(text)`` for a number PyYAML leaves as a string (``1e-4``: YAML 1.1 wants a dot
    and a signed exponent), else ``text`` unchanged. Config fields and command-line overrides
    read numbers through this one rule."""
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped):
        return float(stripped)
    return text


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (safe loader; empty file: ``{}``); a ConfigError names the
    file when it is missing, not YAML, or not a mapping of ``what``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}")
    return data


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a config dataclass from YAML (safe loader), validating every field."""
    return from_dict(cls, read_yaml_mapping(path, f"{cls.__name__} fields"), where="")

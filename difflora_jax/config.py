"""Configuration dataclasses with validation and YAML round-trip.

Every config is a frozen dataclass. ``from_dict`` rejects unknown fields and names the allowed
ones; ``validate`` names the bad field and its allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from difflora_jax.errors import ConfigError

T = TypeVar("T")

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
        _require(self.factor > 0, "rope_scaling.factor", self.factor, "> 0")
        if self.rope_type == "llama3":
            _require(
                self.high_freq_factor > self.low_freq_factor,
                "rope_scaling.high_freq_factor",
                self.high_freq_factor,
                f"> low_freq_factor ({self.low_freq_factor})",
            )
            _require(
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
            _require(isinstance(value, int) and value > 0, field, value, "a positive integer")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"a divisor of num_heads ({self.num_heads})",
        )
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "even (RoPE rotates pairs)")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        _require(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        if self.rope_freq_factors is not None:
            _require(
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
        _choice("method", self.method, ADAPTER_METHODS)
        _choice("init", self.init, ADAPTER_INITS)
        _choice("negative_term", self.negative_term, NEGATIVE_TERMS)
        _choice("lambda_mode", self.lambda_mode, LAMBDA_MODES)
        _require(
            isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "a positive integer"
        )
        _require(self.alpha > 0, "alpha", self.alpha, "> 0")
        _require(0 <= self.dropout < 1, "dropout", self.dropout, "in [0, 1)")
        for target in self.targets:
            _choice("targets", target, LORA_TARGETS)
        if self.layers is not None:
            _require(
                len(self.layers) > 0 and all(i >= 0 for i in self.layers),
                "layers",
                self.layers,
                "a non-empty list of layer indices >= 0 (or null for all layers)",
            )
        if self.lambda_mode == "fixed":
            _require(
                self.lambda_init is not None,
                "lambda_init",
                self.lambda_init,
                "set to the constant lambda when lambda_mode is 'fixed' (the paper uses 0.1)",
            )
        if self.identity_start:
            _require(
                self.lambda_mode == "learned",
                "lambda_mode",
                self.lambda_mode,
                "'learned' with identity_start (lambda starts at 0 and must be able to move)",
            )
            _require(
                not self.group_norm,
                "group_norm",
                self.group_norm,
                "false with identity_start (group norm changes the output at step 0)",
            )
            _require(
                not self.relu_on_differential,
                "relu_on_differential",
                self.relu_on_differential,
                "false with identity_start (ReLU changes the output at step 0)",
            )
            _require(
                self.lambda_init in (None, 0.0),
                "lambda_init",
                self.lambda_init,
                "null or 0 with identity_start (lambda starts at exactly 0)",
            )

    def check_model(self, config: ModelConfig) -> None:
        """Errors for a method that does not fit the model (e.g. a layer index out of range)."""
        if self.layers is not None:
            bad = [i for i in self.layers if i >= config.num_layers]
            _require(
                not bad, "layers", self.layers, f"indices below num_layers ({config.num_layers})"
            )

    def adapted_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else tuple(sorted(set(self.layers)))


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"config field {field!r} = {value!r} is invalid: allowed values {list(allowed)}"
        )


# Public shapes of common models, usable without weights (parameter counts, sharding, speed).
SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        name="smollm2-135m",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    "llama-3.2-1b": ModelConfig(
        name="llama-3.2-1b",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3.1-8b": ModelConfig(
        name="llama-3.1-8b",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-2-7b": ModelConfig(
        name="llama-2-7b",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
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


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
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
    if hasattr(config, "validate"):
        config.validate()
    return config


def _convert(hint: Any, value: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
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
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, field)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {field!r} = {value!r}: expected a list")
        item = args[0] if args else Any
        return tuple(_convert(item, v, field) for v in value)
    if hint is float:
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


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a config dataclass from YAML (safe loader), validating every field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return from_dict(cls, data or {}, where="")


# ---------------------------------------------------------------------------------------------
# HF config.json -> ModelConfig

SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM",)


def model_config_from_hf(hf: dict[str, Any], name: str = "") -> ModelConfig:
    """ModelConfig from the dict of a Hugging Face Llama ``config.json``."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "llama" and not any(a in SUPPORTED_HF_ARCHITECTURES for a in archs):
        raise ConfigError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
            f"difflora_jax supports Llama-family checkpoints (model_type 'llama', "
            f"{list(SUPPORTED_HF_ARCHITECTURES)})"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(
                f"config.json sets {flag}=true; biased Llama variants are not supported"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    try:
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_scaling = None
        rs = hf.get("rope_scaling")
        # transformers >= 5 writes rope settings under "rope_parameters".
        rp = hf.get("rope_parameters")
        rope_theta = hf.get("rope_theta")
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rs = rp
        if rs:
            rope_type = rs.get("rope_type", rs.get("type", "default"))
            if rope_type != "default":
                if rope_type not in ROPE_TYPES:
                    raise ConfigError(
                        f"config.json rope_scaling type {rope_type!r} is not supported; "
                        f"allowed: {list(ROPE_TYPES)}"
                    )
                rope_scaling = RopeScaling(
                    rope_type=rope_type,
                    factor=float(rs.get("factor", 1.0)),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        rs.get("original_max_position_embeddings", 8192)
                    ),
                )
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        config = ModelConfig(
            name=name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks the required field {e.args[0]!r}") from e
    config.validate()
    return config


# ---------------------------------------------------------------------------------------------
# Training: data source, optimizer, the whole run

DATA_SOURCES = ("synthetic", "jsonl", "hf", "tfds", "random")
BASE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training examples come from and how they become ``[batch, max_length]`` batches.

    ``source``: ``synthetic`` (the seeded instruction mix of ``difflora_jax.data.synthetic``,
    ``num_examples`` items of ``tasks``), ``jsonl`` (a file of Tulu ``messages`` rows at
    ``path``), ``hf`` (a Hugging Face dataset name or ``save_to_disk`` directory at ``path``,
    split ``split``), ``tfds`` (a prepared TFDS array_record dataset named ``path``, in
    ``data_dir``) or ``random`` (uniform random tokens, no tokenizer needed: smoke tests and
    throughput). ``seed`` fixes the shuffle order (and the synthetic items).
    """

    source: str = "synthetic"
    path: str | None = None
    split: str = "train"
    data_dir: str | None = None
    num_examples: int = 2000
    tasks: tuple[str, ...] | None = None
    max_length: int = 4096
    packing: bool = True
    shuffle: bool = True
    seed: int = 0

    def validate(self) -> None:
        _choice("data.source", self.source, DATA_SOURCES)
        if self.source in ("jsonl", "hf", "tfds"):
            _require(
                bool(self.path),
                "data.path",
                self.path,
                f"set for source {self.source!r} (a JSONL file, a dataset name or directory, "
                "or a TFDS name)",
            )
        _require(
            isinstance(self.max_length, int) and self.max_length >= 2,
            "data.max_length",
            self.max_length,
            "an integer >= 2",
        )
        _require(
            isinstance(self.num_examples, int) and self.num_examples > 0,
            "data.num_examples",
            self.num_examples,
            "a positive integer",
        )
        if self.source == "synthetic":
            from difflora_jax.data.synthetic import SPLITS, TASKS

            _choice("data.split", self.split, tuple(SPLITS))
            for task in self.tasks or ():
                _choice("data.tasks", task, tuple(TASKS))
            if self.tasks is not None:
                _require(len(self.tasks) > 0, "data.tasks", self.tasks, "non-empty (or null)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then linear decay to 0, and gradient clipping by global norm.

    Update ``k`` (0-based) uses ``learning_rate * k / warmup_steps`` while ``k < warmup_steps``,
    then ``learning_rate * (total_steps - k) / (total_steps - warmup_steps)`` (the schedule of
    transformers' ``get_linear_schedule_with_warmup``, which open-instruct uses). Weight decay
    (decoupled) applies to adapter matrices only, not to lambda vectors or norm scales.
    ``max_grad_norm = 0`` turns clipping off. Hashable: the jitted train step takes it static.
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def validate(self) -> None:
        _require(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _require(
            isinstance(self.total_steps, int) and self.total_steps > 0,
            "total_steps",
            self.total_steps,
            "a positive integer",
        )
        _require(
            isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.total_steps,
            "warmup_steps",
            self.warmup_steps,
            f"an integer in [0, total_steps = {self.total_steps})",
        )
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0: off)")
        _require(0 <= self.b1 < 1, "adam_b1", self.b1, "in [0, 1)")
        _require(0 <= self.b2 < 1, "adam_b2", self.b2, "in [0, 1)")
        _require(self.eps > 0, "adam_eps", self.eps, "> 0")


# Fields a resumed run may change: bookkeeping, and where the model is found (the checkpoint's
# base-model fingerprint still has to match) or which attention kernel computes the same math.
RESUMABLE_CHANGES = (
    "save_every",
    "keep_checkpoints",
    "log_every",
    "output_dir",
    "model",
    "attention_backend",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One adapter-training run (defaults: the paper's setup, spec section 6).

    ``model``: a HF directory, ``.gguf`` file or alias, loaded with base weights in ``dtype``
    (adapters and optimizer state are float32 whatever it is). ``method``: a methods YAML path,
    a method name in ``configs/methods`` (``difflora-32``) or an inline mapping of
    ``AdapterConfig`` fields.
    ``batch_size`` sequences per optimizer update, split into ``grad_accum_steps``
    micro-batches; ``max_steps`` updates. ``seed`` seeds adapter dropout (``data.seed`` the
    data order). Everything lands in ``output_dir``: ``config.yaml``, ``metrics.jsonl``,
    ``tensorboard/`` and ``checkpoints/`` (every ``save_every`` steps and at the end, the last
    ``keep_checkpoints`` kept).
    """

    model: str
    method: str | dict[str, Any]
    output_dir: str
    dtype: str = "bfloat16"
    data: DataConfig = DataConfig()
    batch_size: int = 64
    grad_accum_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    attention_backend: str = "xla"

    def validate(self) -> None:
        _require(bool(self.model), "model", self.model, "a model directory, .gguf file or alias")
        _require(bool(self.output_dir), "output_dir", self.output_dir, "a directory path")
        _choice("dtype", self.dtype, BASE_DTYPES)
        _choice("attention_backend", self.attention_backend, ("xla", "jax"))
        if isinstance(self.method, dict):
            try:
                from_dict(AdapterConfig, self.method, where="method")
            except ConfigError as e:
                raise ConfigError(f"method: {e}") from e
        else:
            _require(
                isinstance(self.method, str) and bool(self.method),
                "method",
                self.method,
                "the path of a methods YAML or a mapping of adapter fields",
            )
        for field in ("batch_size", "grad_accum_steps", "max_steps", "save_every"):
            value = getattr(self, field)
            _require(isinstance(value, int) and value > 0, field, value, "a positive integer")
        for field in ("keep_checkpoints", "log_every"):
            value = getattr(self, field)
            _require(isinstance(value, int) and value > 0, field, value, "a positive integer")
        _require(
            self.batch_size % self.grad_accum_steps == 0,
            "batch_size",
            self.batch_size,
            f"a multiple of grad_accum_steps ({self.grad_accum_steps})",
        )
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        self.optimizer_config().validate()
        self.data.validate()

    @property
    def warmup_steps(self) -> int:
        """``int(warmup_ratio * max_steps)``, as open-instruct rounds it."""
        return int(self.warmup_ratio * self.max_steps)

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_steps,
            total_steps=self.max_steps,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            b1=self.adam_b1,
            b2=self.adam_b2,
            eps=self.adam_eps,
        )

    def adapter_config(self) -> AdapterConfig:
        """The method: the inline mapping, a methods YAML path, or a method name in
        ``configs/methods`` (``difflora-32``)."""
        if isinstance(self.method, dict):
            return from_dict(AdapterConfig, self.method, where="method")
        from difflora_jax.methods import load_method

        try:
            return load_method(self.method)
        except ConfigError as e:
            raise ConfigError(f"method {self.method}: {e}") from e


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {key!r} is malformed (empty part)")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"override {key!r}: {where!r} is {child!r}, not a mapping, so it has no field "
                f"{parts[i + 1]!r}"
            )
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.max_length=256"`` -> ``("data.max_length", 256)``; values are read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form KEY=VALUE (e.g. max_steps=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {e}") from e
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key, value


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file (or none) plus ``KEY=VALUE`` overrides (dotted for nested
    fields: ``data.max_length=256``, ``method.rank=16``).

    A relative ``method`` path is looked up from the working directory, then from the config
    file's directory. Overriding ``method.*`` of a method given by path or name inlines it first.
    """
    data: dict[str, Any] = {}
    base = None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of TrainConfig fields")
        base = path.parent
    method = data.get("method")
    if isinstance(method, str) and base is not None and not Path(method).is_absolute():
        if not Path(method).exists() and (base / method).exists():
            data["method"] = str(base / method)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for text in overrides:
        key, value = parse_override(text)
        top = key.split(".")[0]
        if top not in fields:
            raise ConfigError(
                f"override {text!r}: unknown field {top!r}; allowed fields: {sorted(fields)}"
            )
        if top == "method" and "." in key and isinstance(data.get("method"), str):
            from difflora_jax.methods import load_method

            try:
                data["method"] = to_dict(load_method(data["method"]))
            except ConfigError as e:
                raise ConfigError(f"override {text!r}: method {data['method']}: {e}") from e
        set_dotted(data, key, value)
    return from_dict(TrainConfig, data)

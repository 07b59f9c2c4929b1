"""Training configs, beside the trainer: the data source, the optimizer, the whole run, and the
``KEY=VALUE`` overrides of the command line.

Numbers are read the same way from a YAML file and from an override: ``learning_rate: 1e-4``
(which PyYAML reads as a string) and ``learning_rate=1e-4`` both give 0.0001.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from difflora_jax.catalog import load_method
from difflora_jax.config import (
    DROPOUT_PRNGS,
    REMAT_POLICIES,
    AdapterConfig,
    check_choice,
    check_field,
    from_dict,
    read_yaml_mapping,
    to_dict,
    yaml_number,
)
from difflora_jax.data.synthetic import SPLITS, TASKS
from difflora_jax.errors import ConfigError
from difflora_jax.modeling.attention import BACKENDS
from difflora_jax.parallel import MeshConfig, make_rules

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

    ``streams`` (chat sources): the batch's rows come from this many independent packed streams
    (``data.streams``), and each process reads, tokenizes and packs only the streams of its own
    rows; the batches are the same for any process count. 1 (the default): one stream, read
    whole by every process.
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
    streams: int = 1

    def validate(self) -> None:
        check_choice("data.source", self.source, DATA_SOURCES)
        check_field(
            isinstance(self.streams, int) and self.streams >= 1,
            "data.streams",
            self.streams,
            "an integer >= 1",
        )
        if self.source in ("jsonl", "hf", "tfds"):
            check_field(
                bool(self.path),
                "data.path",
                self.path,
                f"set for source {self.source!r} (a JSONL file, a dataset name or directory, "
                "or a TFDS name)",
            )
        check_field(
            isinstance(self.max_length, int) and self.max_length >= 2,
            "data.max_length",
            self.max_length,
            "an integer >= 2",
        )
        check_field(
            isinstance(self.num_examples, int) and self.num_examples > 0,
            "data.num_examples",
            self.num_examples,
            "a positive integer",
        )
        if self.source == "synthetic":
            check_choice("data.split", self.split, tuple(SPLITS))
            for task in self.tasks or ():
                check_choice("data.tasks", task, tuple(TASKS))
            if self.tasks is not None:
                check_field(len(self.tasks) > 0, "data.tasks", self.tasks, "non-empty (or null)")


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
        check_field(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        check_field(
            isinstance(self.total_steps, int) and self.total_steps > 0,
            "total_steps",
            self.total_steps,
            "a positive integer",
        )
        check_field(
            isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps < self.total_steps,
            "warmup_steps",
            self.warmup_steps,
            f"an integer in [0, total_steps = {self.total_steps})",
        )
        check_field(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        check_field(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, ">= 0 (0: off)")
        check_field(0 <= self.b1 < 1, "adam_b1", self.b1, "in [0, 1)")
        check_field(0 <= self.b2 < 1, "adam_b2", self.b2, "in [0, 1)")
        check_field(self.eps > 0, "adam_eps", self.eps, "> 0")


# Fields a resumed run may change: bookkeeping, and where the model is found (the checkpoint's
# base-model fingerprint still has to match) or how the same math is computed (attention
# kernel, scanned or unrolled layers, remat).
RESUMABLE_CHANGES = (
    "save_every",
    "keep_checkpoints",
    "log_every",
    "output_dir",
    "model",
    "attention_backend",
    "scan_layers",
    "remat",
    "mesh",  # a resumed run may use another mesh: the checkpoint is restored resharded
    "sharding_rules",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One adapter-training run (defaults: the paper's setup, spec section 6).

    ``model``: a HF directory, ``.gguf`` file or alias, loaded with base weights in ``dtype``
    (adapters and optimizer state are float32 whatever it is). ``method``: a methods YAML path,
    a named method shipped in ``difflora_jax/configs/methods`` (``difflora-32``) or an inline
    mapping of ``AdapterConfig`` fields.
    ``batch_size`` sequences per optimizer update, split into ``grad_accum_steps``
    micro-batches; ``max_steps`` updates. ``seed`` seeds adapter dropout, whose keys come from
    the generator ``dropout_prng`` (``data.seed`` the
    data order). ``scan_layers``: the decoder layers run under one ``lax.scan`` (compiled once,
    not once per layer; False unrolls them, same numbers); ``remat``: what each layer keeps
    for the backward pass (``none``, ``full``, ``dots_saveable``,
    ``dots_with_no_batch_dims_saveable``: the projections but not the attention maps).
    ``mesh``: devices per mesh axis (``data``, ``fsdp``, ``tensor``; default all on ``data``);
    ``sharding_rules``: overrides of ``parallel.DEFAULT_RULES`` (logical axis name -> mesh
    axis, list of mesh axes or null). ``batch_size`` is the global batch, split over the
    ``data`` x ``fsdp`` devices. Everything lands in ``output_dir``: ``config.yaml``,
    ``metrics.jsonl``,
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
    dropout_prng: str = DROPOUT_PRNGS[0]
    scan_layers: bool = True
    remat: str = "none"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    sharding_rules: dict[str, Any] | None = None

    def validate(self) -> None:
        check_field(bool(self.model), "model", self.model, "a model directory, .gguf file or alias")
        check_field(bool(self.output_dir), "output_dir", self.output_dir, "a directory path")
        check_choice("dtype", self.dtype, BASE_DTYPES)
        check_choice("attention_backend", self.attention_backend, BACKENDS)
        check_choice("dropout_prng", self.dropout_prng, DROPOUT_PRNGS)
        check_choice("remat", self.remat, REMAT_POLICIES)
        self.mesh.validate()
        make_rules(self.sharding_rules)
        if isinstance(self.method, dict):
            try:
                from_dict(AdapterConfig, self.method, where="method")
            except ConfigError as e:
                raise ConfigError(f"method: {e}") from e
        else:
            check_field(
                isinstance(self.method, str) and bool(self.method),
                "method",
                self.method,
                "the path of a methods YAML or a mapping of adapter fields",
            )
        for field in ("batch_size", "grad_accum_steps", "max_steps", "save_every"):
            value = getattr(self, field)
            check_field(isinstance(value, int) and value > 0, field, value, "a positive integer")
        for field in ("keep_checkpoints", "log_every"):
            value = getattr(self, field)
            check_field(isinstance(value, int) and value > 0, field, value, "a positive integer")
        check_field(
            self.batch_size % self.grad_accum_steps == 0,
            "batch_size",
            self.batch_size,
            f"a multiple of grad_accum_steps ({self.grad_accum_steps})",
        )
        check_field(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "in [0, 1)")
        self.optimizer_config().validate()
        self.data.validate()
        check_field(
            self.batch_size % self.data.streams == 0,
            "data.streams",
            self.data.streams,
            f"a divisor of batch_size ({self.batch_size}): each stream fills "
            "batch_size / streams rows",
        )

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
        ``difflora_jax/configs/methods`` (``difflora-32``)."""
        if isinstance(self.method, dict):
            return from_dict(AdapterConfig, self.method, where="method")
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
    return key, yaml_number(value) if isinstance(value, str) else value


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
        data = read_yaml_mapping(path, "TrainConfig fields")
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
        named = data.get("method")
        if top == "method" and "." in key and isinstance(named, str):
            try:
                data["method"] = to_dict(load_method(named))
            except ConfigError as e:
                raise ConfigError(f"override {text!r}: method {data['method']}: {e}") from e
        set_dotted(data, key, value)
    return from_dict(TrainConfig, data)

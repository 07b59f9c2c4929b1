"""Presets of ``difflora reproduce``: which model, data and training run each variant gets, and
how large each evaluation is. Shipped as YAML in ``difflora_jax/configs/presets/`` (``cpu-small``,
``paper``); a path to a YAML file of the same form works too, and ``KEY=VALUE`` overrides
(``train.max_steps=100``, ``eval.nih_lengths=[1024,2048]``) change any field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difflora_jax.catalog import configs_dir, load_method, model_names, model_shape
from difflora_jax.config import ModelConfig, check_field, from_dict, read_yaml_mapping
from difflora_jax.errors import ConfigError, DiffLoRAError
from difflora_jax.evaluation.nih import TASKS as NIH_TASKS
from difflora_jax.training.config import TrainConfig, parse_override, set_dotted
from difflora_jax.weights.loading import read_model_config


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """The size of each evaluation (the paper's protocol: ../shared/spec/evaluation.md).

    ``*_data``: a real data file instead of the generated stand-in (RULER-style NIH JSONL,
    ``{"text", "label"}`` ICL JSONL, ``{question, documents, answers}`` RAG JSONL).
    ``lm_eval_tasks``: lm-evaluation-harness task names (``lm_eval_include``: a directory of
    task YAMLs); ``lm_eval_local``: also a multiple-choice task over the held-out instruction mix,
    written to local files (runs offline). ``lm_eval_limit``: items per task (None: all).
    """

    batch_size: int = 4
    heldout_items: int = 32
    humaneval_num: int = 164
    humaneval_max_new_tokens: int = 384
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: str | None = None
    lm_eval_local: bool = False
    lm_eval_limit: int | None = None
    icl_shots: tuple[int, ...] = (4, 16, 64)
    icl_num: int = 20
    icl_data: str | None = None
    nih_tasks: tuple[str, ...] = ("nih-mk2", "nih-mk3", "nih-mv")
    nih_lengths: tuple[int, ...] = (1024, 2048, 4096)
    nih_num: int = 20
    nih_data: str | None = None
    rag_distractors: tuple[int, ...] = (4,)
    rag_num: int = 20
    rag_data: str | None = None
    attention_lengths: tuple[int, ...] = (1024,)
    attention_num: int = 10

    def validate(self) -> None:
        for name in ("batch_size", "heldout_items", "humaneval_num", "humaneval_max_new_tokens",
                     "icl_num", "nih_num", "rag_num", "attention_num"):  # fmt: skip
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, f"eval.{name}", value, "> 0")
        for name in ("icl_shots", "nih_lengths", "rag_distractors", "attention_lengths"):
            values = getattr(self, name)
            check_field(
                bool(values) and all(isinstance(v, int) and v > 0 for v in values),
                f"eval.{name}",
                values,
                "a non-empty list of positive integers",
            )
        unknown = [t for t in self.nih_tasks if t not in NIH_TASKS]
        check_field(not unknown, "eval.nih_tasks", self.nih_tasks, f"a subset of {list(NIH_TASKS)}")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A reproduction setup: ``train`` holds TrainConfig fields shared by every variant
    (``method`` and ``output_dir`` are set per variant); ``variants`` are method names or
    methods YAML paths, trained in this order; ``eval`` sizes the evaluations."""

    name: str
    description: str = ""
    variants: tuple[str, ...] = ()
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval: EvalPlan = EvalPlan()

    def validate(self) -> None:
        check_field(bool(self.variants), "variants", self.variants, "at least one method")
        for key in ("method", "output_dir"):
            check_field(key not in self.train, f"train.{key}", self.train.get(key), "unset (set per variant)")  # fmt: skip
        for variant in self.variants:
            load_method(variant)  # a clear error for an unknown method, before any work
        self.train_config("lora-r8", "unused").validate()

    def train_config(self, variant: str, output_dir: str | Path) -> TrainConfig:
        """The TrainConfig of one variant, run in ``output_dir``."""
        data = {**self.train, "method": variant, "output_dir": str(output_dir)}
        return from_dict(TrainConfig, data, where="train")


def preset_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "presets").glob("*.yaml"))


def load_preset(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Preset:
    """A shipped preset by name, or a preset YAML file, with ``KEY=VALUE`` overrides."""
    path = Path(name_or_path)
    if not path.is_file():
        path = configs_dir() / "presets" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {str(name_or_path)!r}: not a file and not one of {preset_names()}"
            )
    data = read_yaml_mapping(path, "Preset fields")
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] not in {f.name for f in dataclasses.fields(Preset)}:
            raise ConfigError(
                f"override {text!r}: unknown field; allowed: name, description, variants, "
                "train.<TrainConfig field>, eval.<EvalPlan field>"
            )
        set_dotted(data, key, value)
    return from_dict(Preset, data, where=f"preset {path.stem}")


def model_architecture(source: str) -> ModelConfig:
    """The preset model's shape: read from the checkpoint when it is here, else the catalog
    shape its name starts with (``Llama-3.2-1B-Instruct`` -> ``llama-3.2-1b``)."""
    try:
        return read_model_config(source)
    except DiffLoRAError:
        name = Path(source).name.lower()
        matches = [n for n in model_names() if name.startswith(n)]
        if not matches:
            raise
        return model_shape(max(matches, key=len))

"""Named adapter methods (the paper's variants, ``configs/methods/*.yaml``) and model shapes."""

from __future__ import annotations

from pathlib import Path

from difflora_jax.config import SHAPES, AdapterConfig, ModelConfig, load_yaml
from difflora_jax.errors import ConfigError

METHODS_DIR = Path(__file__).resolve().parents[1] / "configs" / "methods"
PAPER_VARIANTS = (
    "lora-r8",
    "difflora-64",
    "difflora-64-fixed-lambda",
    "difflora-32",
    "difflora-32-gn",
    "difflora-identity",
    "reference-quickstart",
)


def method_names() -> list[str]:
    return sorted(p.stem for p in METHODS_DIR.glob("*.yaml")) if METHODS_DIR.is_dir() else []


def load_method(name_or_path: str | Path) -> AdapterConfig:
    """An AdapterConfig from a YAML path or a method name in ``configs/methods``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_yaml(AdapterConfig, path)
    candidate = METHODS_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return load_yaml(AdapterConfig, candidate)
    raise ConfigError(
        f"unknown method {str(name_or_path)!r}: not a YAML file; known methods: {method_names()}"
    )


def model_config_for(source: str) -> ModelConfig:
    """A ModelConfig from a shape alias (``llama-3.2-1b``...) or a checkpoint's metadata only."""
    if source in SHAPES:
        return SHAPES[source]
    from difflora_jax.weights.loading import read_model_config

    return read_model_config(source)

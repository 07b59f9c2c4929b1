"""Named model shapes and adapter methods, shipped inside the package as YAML files.

``difflora_jax/configs/models/<name>.yaml`` holds ModelConfig fields (public shapes, usable
without weights: parameter counts, memory plans, benchmarks); ``configs/methods/<name>.yaml``
holds AdapterConfig fields (one per variant of the paper). They are package data, found the same
way from an editable install, a wheel, and any working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from difflora_jax.config import AdapterConfig, ModelConfig, load_yaml
from difflora_jax.errors import ConfigError

# The variants `difflora params` lists by default, in the paper's order (then ours).
PAPER_VARIANTS = (
    "lora-r8",
    "difflora-64",
    "difflora-64-fixed-lambda",
    "difflora-32",
    "difflora-32-gn",
    "difflora-identity",
    "reference-quickstart",
)


def configs_dir() -> Path:
    """The package's ``configs`` directory (holding ``models/`` and ``methods/``)."""
    return Path(str(resources.files("difflora_jax") / "configs"))


def _names(kind: str) -> list[str]:
    directory = configs_dir() / kind
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def method_names() -> list[str]:
    """The named adapter methods (``configs/methods/*.yaml``)."""
    return _names("methods")


def model_names() -> list[str]:
    """The named model shapes (``configs/models/*.yaml``)."""
    return _names("models")


def load_method(name_or_path: str | Path) -> AdapterConfig:
    """An AdapterConfig from a YAML path or a method name (``difflora-32``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_yaml(AdapterConfig, path)
    candidate = configs_dir() / "methods" / f"{name_or_path}.yaml"
    if candidate.is_file():
        return load_yaml(AdapterConfig, candidate)
    raise ConfigError(
        f"unknown method {str(name_or_path)!r}: not a YAML file and not a named method; "
        f"known methods: {method_names()}"
    )


def model_shape(name: str) -> ModelConfig:
    """The ModelConfig of a named shape (``llama-3.2-1b``); ConfigError listing the known ones."""
    path = configs_dir() / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model shape {name!r}; known shapes: {model_names()}")
    return load_yaml(ModelConfig, path)

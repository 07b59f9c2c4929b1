"""Reading a Hugging Face checkpoint directory: config.json plus single or sharded safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

from difflora_jax.config import ModelConfig, model_config_from_hf
from difflora_jax.errors import CheckpointError, ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no config.json; is it a Hugging Face model directory?"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    try:
        return model_config_from_hf(raw, name=directory.name)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """Lazy name -> numpy tensor view over the safetensors files of a directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_FILE
        single = directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
            self._files = {name: directory / file for name, file in weight_map.items()}
        elif single.is_file():
            self._files = {name: single for name in self._keys_of(single)}
        else:
            pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
                p.name for p in directory.glob("*.pt*")
            )
            hint = (
                f" (found {pickles}: pickle-based weights are never loaded; convert them to "
                "safetensors)"
                if pickles
                else ""
            )
            raise CheckpointError(f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        for file in set(self._files.values()):
            if not file.is_file():
                raise CheckpointError(f"the safetensors index names {file.name}, which is missing")

    @staticmethod
    def _keys_of(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="numpy") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._files[name]
        try:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

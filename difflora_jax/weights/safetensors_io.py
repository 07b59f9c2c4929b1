"""Safetensors in and out (never a pickle): the tensors of a Hugging Face checkpoint directory
(single or sharded, read lazily), and whole files for adapters and merged exports."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bfloat16 safetensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from difflora_jax.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What torch's save_pretrained writes in the header; transformers checks it.
SAFETENSORS_METADATA = {"format": "pt"}


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """Lazy name -> numpy tensor view over the safetensors files of a directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.bytes_read = 0  # tensor bytes read so far (whole tensors and blocks)
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
        return _read(file, lambda f: list(f.keys()))

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = _read(self._files[name], lambda f: f.get_tensor(name), tensor=name)
        self.bytes_read += tensor.nbytes
        return tensor

    def shape_of(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (no data read)."""
        return tuple(_read(self._files[name], lambda f: f.get_slice(name).get_shape(), tensor=name))

    def read_block(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``tensor[index]`` (one slice per axis), reading only its bytes (rows of
        a contiguous range as one read; what sharded loading asks for)."""
        block = _read(self._files[name], lambda f: f.get_slice(name)[index], tensor=name)
        self.bytes_read += block.nbytes
        return block

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _read(file: Path, what, *, tensor: str | None = None):
    """``what(handle)`` on an open safetensors file; any failure is a CheckpointError."""
    try:
        with safe_open(file, framework="numpy") as handle:
            return what(handle)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        if tensor is not None:
            raise CheckpointError(f"cannot read tensor {tensor!r} from {file}: {e}") from e
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def read_safetensors(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as numpy; ``what`` names the expected directory
    kind in the error when the file is missing."""
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.glob("*.bin"))
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise CheckpointError(f"{path.parent} has no {path.name}; is it {what}?{hint}")
    return _read(path, lambda f: {name: f.get_tensor(name) for name in f.keys()})


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` as one safetensors file (contiguous, with torch's header metadata)."""
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        str(path),
        metadata=SAFETENSORS_METADATA,
    )

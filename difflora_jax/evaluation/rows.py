"""Rows of a real evaluation data set, wherever it lives: ``read_rows(spec)``.

``spec``: a local JSONL file (one JSON object per line); ``hf:NAME[:SPLIT]``, a Hugging Face
``datasets`` split (a ``save_to_disk`` directory, a local data directory, or a hub name when
online; default split ``test``); or ``tfds:NAME[:SPLIT]``, a prepared TFDS dataset in
array_record format read through ``tfds.data_source`` (``$TFDS_DATA_DIR`` or TFDS's default
directory; default split ``test``). Each row comes as ``(where, dict)``, ``where`` naming the
file and line or the dataset and index for error messages; bytes are decoded to str.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from difflora_jax.data.sources import jsonl_rows, open_hf_split, plain_value
from difflora_jax.errors import AssetNotFoundError, ConfigError, DataError

DEFAULT_SPLIT = "test"


def _name_split(text: str) -> tuple[str, str]:
    name, _, split = text.partition(":")
    if not name:
        raise ConfigError(f"data {text!r}: no dataset name")
    return name, split or DEFAULT_SPLIT


def read_rows(spec: str | os.PathLike, what: str = "evaluation") -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for every row of ``spec`` (see the module docstring)."""
    text = str(spec)
    if text.startswith("hf:"):
        yield from _hf_rows(*_name_split(text[3:]))
    elif text.startswith("tfds:"):
        yield from _tfds_rows(*_name_split(text[5:]))
    else:
        yield from _jsonl_rows(Path(text).expanduser(), what)


def _jsonl_rows(path: Path, what: str) -> Iterator[tuple[str, dict]]:
    if not path.is_file():
        raise AssetNotFoundError(
            f"{what} file not found: {path} (or name a dataset: hf:NAME[:SPLIT], tfds:NAME[:SPLIT])"
        )
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object")
        yield where, row


def _hf_rows(name: str, split: str) -> Iterator[tuple[str, dict]]:
    dataset = open_hf_split(name, split)
    for i in range(len(dataset)):
        yield f"hf:{name}[{split}][{i}]", {k: plain_value(v) for k, v in dataset[i].items()}


def _tfds_rows(name: str, split: str) -> Iterator[tuple[str, dict]]:
    import tensorflow_datasets as tfds

    try:
        source: Any = tfds.data_source(name, split=split)
    except Exception as e:
        raise DataError(
            f"cannot open TFDS dataset {name!r} (split {split!r}) as an array_record data "
            f"source (prepare it with file_format='array_record'): {e}"
        ) from e
    for i in range(len(source)):
        record: Any = source[i]
        yield f"tfds:{name}[{split}][{i}]", {k: plain_value(v) for k, v in record.items()}

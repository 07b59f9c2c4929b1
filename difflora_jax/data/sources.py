"""Sources of chat examples: local JSONL files, Hugging Face ``datasets``, TFDS array_record.

Every source is a random-access sequence (``len`` and ``source[i]``) of example dicts whose
``"messages"`` is a list of ``{"role", "content"}`` dicts with ``str`` values, which is what
``SFTBatchIterator`` needs to shuffle by epoch. ``"messages"`` may be stored as such a list, as a
JSON string of it (or bytes), or as TFDS decodes a ``Sequence({"role", "content"})`` feature (a
dict of lists); other fields pass through, bytes decoded to ``str``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from difflora_jax.data.chat import validate_messages
from difflora_jax.errors import AssetNotFoundError, ConfigError, DataError


def plain_value(value: Any) -> Any:
    """``value`` with bytes decoded to str and NumPy values made plain Python (lists, scalars)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray):
        return [plain_value(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def normalize_example(row: Mapping[str, Any], where: str = "example") -> dict[str, Any]:
    """A source row as a plain example dict with ``"messages"`` a list of str dicts."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a row must be a dict, got {type(row).__name__}")
    out = {key: plain_value(value) for key, value in row.items() if key != "messages"}
    if "messages" not in row:
        raise DataError(f"{where}: example has no 'messages' field (keys: {sorted(row)})")
    messages = plain_value(row["messages"])
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'messages' is a string but not valid JSON: {e}") from e
    if isinstance(messages, Mapping):  # TFDS Sequence({"role", "content"}): dict of lists
        roles, contents = plain_value(messages.get("role")), plain_value(messages.get("content"))
        if not isinstance(roles, list) or not isinstance(contents, list):
            raise DataError(f"{where}: 'messages' is a dict without 'role' and 'content' lists")
        if len(roles) != len(contents):
            raise DataError(
                f"{where}: 'messages' holds {len(roles)} roles but {len(contents)} contents"
            )
        messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    elif isinstance(messages, (list, tuple)):
        messages = [
            {k: plain_value(v) for k, v in m.items()} if isinstance(m, Mapping) else m
            for m in messages
        ]
    out["messages"] = messages
    return out


class ExampleSource(Sequence):
    """A random-access view of ``rows`` (anything with ``len`` and integer indexing) that yields
    normalized, validated example dicts; errors name ``name`` and the row index."""

    def __init__(self, rows, name: str, getter: Callable[[Any, int], Any] | None = None):
        self._rows = rows
        self._getter = getter or (lambda rows, i: rows[i])
        self.name = name

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} examples")
        where = f"{self.name} row {i}"
        example = normalize_example(self._getter(self._rows, i), where)
        validate_messages(example, where)
        return example

    def __repr__(self) -> str:
        return f"ExampleSource({self.name!r}, {len(self)} examples)"


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-blank line of the JSONL file ``path``; ``where`` names
    the file and 1-based line number, and an invalid line raises ``DataError`` naming it."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e}") from e


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All examples of a JSONL file (one JSON object per line; blank lines skipped).

    Every line is checked now; an error names the file and the 1-based line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetNotFoundError(f"JSONL file {path} does not exist")
    examples = []
    for where, row in jsonl_rows(path):
        example = normalize_example(row, where)
        validate_messages(example, where)
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: the file holds no examples")
    return examples


def open_hf_split(name_or_path: str | os.PathLike, split: str) -> Any:
    """A Hugging Face ``datasets`` split: a directory written by ``save_to_disk`` (a ``Dataset``
    or a ``DatasetDict``), or anything ``datasets.load_dataset(name_or_path, split=split)``
    loads (a local data directory or file type, or a hub name when online). No loading script
    or other remote code runs (``datasets`` >= 4 has none; older versions default to refusing).
    """
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(
            "Hugging Face data needs the `datasets` package: python -m pip install datasets"
        ) from e
    text = str(name_or_path)
    path = Path(text).expanduser()
    # save_to_disk writes state.json (a Dataset) or dataset_dict.json (a DatasetDict)
    saved = path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))
    try:
        if saved:
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(
                        f"{path} has no split {split!r}; it holds {sorted(dataset.keys())}"
                    )
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(text, split=split)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise AssetNotFoundError(f"dataset {text!r} (split {split!r}) not found: {e}") from e
    except Exception as e:
        raise DataError(f"cannot load dataset {text!r} (split {split!r}): {e}") from e
    return dataset


def load_hf_dataset(name_or_path: str | os.PathLike, split: str = "train") -> ExampleSource:
    """The chat examples of a Hugging Face ``datasets`` split (``open_hf_split``), which must
    have a ``messages`` column."""
    text = str(name_or_path)
    dataset = open_hf_split(name_or_path, split)
    if "messages" not in dataset.column_names:
        raise DataError(
            f"dataset {text!r} (split {split!r}) has no 'messages' column "
            f"(columns: {dataset.column_names})"
        )
    return ExampleSource(dataset, f"{text}[{split}]")


def load_tfds(
    name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None
) -> ExampleSource:
    """A prepared TFDS dataset in array_record format, read through ``tfds.data_source``
    (random access, no TensorFlow needed). ``split`` takes TFDS slicing (``"train[:90%]"``)."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(
            name, split=split, data_dir=None if data_dir is None else str(data_dir)
        )
    except Exception as e:
        raise DataError(
            f"cannot open TFDS dataset {name!r} (split {split!r}, data_dir {data_dir}) as an "
            f"array_record data source (prepare it with file_format='array_record'): {e}"
        ) from e
    return ExampleSource(source, f"tfds:{name}[{split}]")

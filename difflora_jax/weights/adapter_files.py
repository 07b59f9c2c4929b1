"""Shared pieces of the adapter interchange formats (PEFT, reference DiffLoRA, merged HF).

* ``adapter_layout``: one ``TensorMap`` per adapter parameter of a (model config, adapter
  config) pair, computed from abstract shapes, with the file's tensor name and torch layout;
* ``params_to_tensors`` / ``tensors_to_params``: our flat ``{dotted path: array}`` adapters
  <-> a file's ``{name: (out, in) tensor}``, the second validating every name, shape, dtype
  and value (missing, extra, wrong shape: a CheckpointError naming the tensor and both shapes);
* ``read_json`` / ``write_json``;
* ``staged_directory``: write a directory under a temporary name next to it and rename it at
  the end, so that a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes  # also registers bfloat16 with numpy, for bfloat16 safetensors
import numpy as np

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.errors import CheckpointError
from difflora_jax.modeling.adapters import adapter_shapes
from difflora_jax.weights.layout import TensorMap

# ---------------------------------------------------------------------------------------------
# the adapter parameters of a config pair


def input_axes(path: str, shape: tuple[int, ...]) -> int:
    """How many leading axes of an adapter parameter are inputs of its torch ``nn.Linear``.

    LoRA ``a`` ``[*in, r]`` is ``lora_A`` ``(r, prod(in))``; ``b`` ``[r, *out]`` and a full
    negative-term kernel ``[embed, *out]`` have one input axis; vectors are stored as they are.
    """
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "a":
        return len(shape) - 1
    if leaf in ("b", "kernel"):
        return 1
    return 0


def adapter_layout(
    model_config: ModelConfig,
    adapter: AdapterConfig,
    name_of: Callable[[str], str],
) -> dict[str, TensorMap]:
    """``{our path: TensorMap}`` of every adapter parameter, ``name_of(path)`` its file name."""
    layout = {}
    for path, shape in sorted(adapter_shapes(model_config, adapter).items()):
        layout[path] = TensorMap(path, name_of(path), shape, input_axes(path, shape))
    names = [t.hf_name for t in layout.values()]
    if len(set(names)) != len(names):
        raise AssertionError("two adapter parameters map to the same tensor name")
    return layout


def params_to_tensors(
    layout: Mapping[str, TensorMap], params: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Our flat adapters -> ``{file name: float32 tensor in torch layout}``."""
    missing = sorted(set(layout) - set(params))
    extra = sorted(set(params) - set(layout))
    if missing or extra:
        raise CheckpointError(
            f"the adapters do not match their config: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    tensors = {}
    for path, entry in layout.items():
        value = np.asarray(params[path], np.float32)
        if value.shape != entry.shape:
            raise CheckpointError(
                f"adapter parameter {path!r} has shape {value.shape}, its config needs "
                f"{entry.shape}"
            )
        tensors[entry.hf_name] = np.ascontiguousarray(entry.to_hf(value))
    return tensors


def tensors_to_params(
    layout: Mapping[str, TensorMap],
    tensors: Mapping[str, np.ndarray],
    source: str,
    *,
    expectation: str = "this adapter config on this base model",
) -> dict[str, np.ndarray]:
    """A file's tensors -> our flat float32 adapters, after checking that the names are exactly
    the layout's, and every shape, dtype and value."""
    by_name = {entry.hf_name: entry for entry in layout.values()}
    missing = sorted(set(by_name) - set(tensors))
    extra = sorted(set(tensors) - set(by_name))
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} tensor(s) needed by {expectation}, e.g. {missing[:4]}"
        )
    if extra:
        raise CheckpointError(
            f"{source} holds {len(extra)} tensor(s) not used by {expectation}, e.g. "
            f"{extra[:4]} (was it saved for another adapter config or base model?)"
        )
    params = {}
    for name, entry in sorted(by_name.items()):
        tensor = tensors[name]
        shape = tuple(tensor.shape)
        if shape != entry.hf_shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {shape}, but {expectation} needs "
                f"{entry.hf_shape}"
            )
        dtype = np.dtype(tensor.dtype)
        if not (np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)):
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {dtype}, not a float type")
        value = np.asarray(tensor).astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"{source}: tensor {name!r} holds NaN or inf values")
        params[entry.path] = entry.from_hf(value)
    return params


# ---------------------------------------------------------------------------------------------
# files


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}; is it {what}?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------
# all-or-nothing output directories


def check_output(out: str | os.PathLike, what: str) -> Path:
    """``out`` as an absolute path; CheckpointError if it exists and is not an empty directory."""
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{what} output {out} already exists and is not an empty directory; "
            "choose a new path (nothing is overwritten)"
        )
    return out


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; rename it to ``out`` when the block
    succeeds, delete it (and any parent directory this created) when it fails.

    ``out`` must not exist or be an empty directory: nothing is ever overwritten.
    """
    out = check_output(out, what)
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for directory in reversed(created):
        directory.mkdir()
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise

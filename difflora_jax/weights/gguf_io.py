"""Reading a GGUF file (llama.cpp format) of a Llama-architecture model, without PyTorch.

Tensors are dequantized to float32 with the ``gguf`` package and renamed to Hugging Face names;
the Q and K projections, which llama.cpp stores permuted for its interleaved rotary layout, are
permuted back to the half-split layout transformers (and this package) use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from difflora_jax.config import ModelConfig, RopeScaling
from difflora_jax.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` over ``path``, with a clear error for a file that is not GGUF."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct.error / IndexError on garbage
        raise CheckpointError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from e


def metadata(reader, *, skip_arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """All metadata fields as Python values (large token arrays only when asked for)."""
    out = {}
    for key, field in reader.fields.items():
        if key in skip_arrays:
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise CheckpointError(f"GGUF metadata field {key!r} is unreadable: {e}") from e
    return out


def _architecture(meta: dict[str, Any], path: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; difflora_jax loads "
            f"Llama-family models (general.architecture in {list(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def model_config_from_gguf(reader, path: Path) -> ModelConfig:
    meta = metadata(reader, skip_arrays=("tokenizer.ggml.merges", "tokenizer.ggml.token_type"))
    arch = _architecture(meta, path)

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required and default is None:
                raise CheckpointError(f"{path}: GGUF metadata lacks {full!r}")
            return default
        return meta[full]

    tensor_names = {t.name for t in reader.tensors}
    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("rope.dimension_count", hidden // num_heads, required=False))
    vocab = get("vocab_size", None, required=False)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{path}: GGUF metadata gives neither vocab_size nor tokens")
        vocab = len(tokens)
    rope_scaling = None
    scaling_type = get("rope.scaling.type", "none", required=False)
    if scaling_type == "linear":
        rope_scaling = RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise CheckpointError(f"{path}: GGUF rope scaling {scaling_type!r} is not supported")
    freq_factors = None
    if "rope_freqs.weight" in tensor_names:
        tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        freq_factors = tuple(float(x) for x in _dequantize(tensor, path).reshape(-1))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    try:
        config = ModelConfig(
            name=str(meta.get("general.name", path.stem)),
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads, required=False)),
            head_dim=head_dim,
            rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon")),
            rope_theta=_float32_value(get("rope.freq_base", 10000.0, required=False)),
            rope_scaling=rope_scaling,
            rope_freq_factors=freq_factors,
            max_position_embeddings=int(get("context_length", 4096, required=False)),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
        config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return config


def _float32_value(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf import dequantize

    try:
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}): {e} "
            "(is the file truncated or corrupt?)"
        ) from e


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the rows of a Q or K projection ``[out, in]``."""
    out_dim = weight.shape[0]
    return (
        weight.reshape(num_heads, out_dim // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors that are not parameters."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def read_gguf_tensors(reader, config: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """Every parameter tensor as float32 numpy, keyed by Hugging Face name, HF layout."""
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # folded into config.rope_freq_factors
        name = hf_name(tensor.name)
        if name is None:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {tensor.name!r}")
        weight = _dequantize(tensor, path)
        expected_rows = None
        if name.endswith("q_proj.weight"):
            expected_rows = config.num_heads * config.head_dim
        elif name.endswith("k_proj.weight"):
            expected_rows = config.num_kv_heads * config.head_dim
        if expected_rows is not None:
            if weight.ndim != 2 or weight.shape[0] != expected_rows:
                raise CheckpointError(
                    f"{path}: tensor {tensor.name!r} has shape {weight.shape}, expected "
                    f"({expected_rows}, {config.hidden_size})"
                )
            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
            weight = _unpermute_rotary(weight, heads)
        tensors[name] = weight
    return tensors

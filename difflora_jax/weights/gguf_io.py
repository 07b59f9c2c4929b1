"""Reading a GGUF file (llama.cpp format) of a Llama-architecture model, without PyTorch.

Tensors are dequantized to float32 with the ``gguf`` package and renamed to Hugging Face names;
the Q and K projections, which llama.cpp stores permuted for its interleaved rotary layout, are
permuted back to the half-split layout transformers (and this package) use.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        freq_factors = tuple(float(x) for x in _dequantize(tensor, path, tensor.data).reshape(-1))
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


def _dequantize(tensor, path: Path, data) -> np.ndarray:
    """``data`` (the tensor's rows, or some of them) dequantized to float32."""
    from gguf import dequantize

    try:
        return np.asarray(dequantize(data, tensor.tensor_type), dtype=np.float32)
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


class GGUFCheckpoint(Mapping[str, np.ndarray]):
    """The parameter tensors of a GGUF file by Hugging Face name, in HF layout, float32, read
    lazily: a tensor is dequantized when it is asked for (``checkpoint[name]``), so loading
    holds one dequantized tensor at a time; ``read_block`` dequantizes only a block's rows
    (whole Q/K heads, to undo llama.cpp's rotary interleaving), what sharded loading asks for.
    ``bytes_read`` counts the file bytes read."""

    def __init__(self, reader, config: ModelConfig, path: Path):
        self.config, self.path = config, path
        self.bytes_read = 0
        self._last: tuple[tuple[str, int, int], np.ndarray] | None = None  # last rows read
        self._tensors = {}
        for tensor in reader.tensors:
            if tensor.name == "rope_freqs.weight":
                continue  # folded into config.rope_freq_factors
            name = hf_name(tensor.name)
            if name is None:
                raise CheckpointError(f"{path}: unexpected GGUF tensor {tensor.name!r}")
            self._tensors[name] = tensor
            heads = self._heads(name)
            if heads is not None:
                shape = self.shape_of(name)
                rows = heads * config.head_dim
                if len(shape) != 2 or shape[0] != rows:
                    raise CheckpointError(
                        f"{path}: tensor {tensor.name!r} has shape {shape}, expected "
                        f"({rows}, {config.hidden_size})"
                    )

    def _heads(self, name: str) -> int | None:
        if name.endswith("q_proj.weight"):
            return self.config.num_heads
        if name.endswith("k_proj.weight"):
            return self.config.num_kv_heads
        return None

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The HF shape (GGUF lists dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self._tensors[name].shape))

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        weight = _dequantize(tensor, self.path, tensor.data)
        self.bytes_read += int(tensor.data.nbytes)
        heads = self._heads(name)
        return weight if heads is None else _unpermute_rotary(weight, heads)

    def read_block(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        tensor = self._tensors[name]
        shape = self.shape_of(name)
        r0, r1, _ = index[0].indices(shape[0])
        heads = self._heads(name)
        if heads is not None:  # whole heads: the rotary interleaving is within a head
            d = shape[0] // heads
            lo, hi = r0 // d * d, -(-r1 // d) * d
        else:
            lo, hi = r0, r1
        if self._last is not None and self._last[0] == (name, lo, hi):
            block = self._last[1]  # the same rows for another column block (FSDP)
        else:
            raw = tensor.data[lo:hi]
            self.bytes_read += int(raw.nbytes)
            block = _dequantize(tensor, self.path, raw).reshape(hi - lo, *shape[1:])
            if heads is not None:
                block = _unpermute_rotary(block, (hi - lo) // (shape[0] // heads))
            self._last = ((name, lo, hi), block)
        block = block[r0 - lo : r1 - lo]
        return block if len(shape) == 1 else block[:, index[1]]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_gguf_tensors(reader, config: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """Every parameter tensor as float32 numpy, keyed by Hugging Face name, HF layout."""
    checkpoint = GGUFCheckpoint(reader, config, path)
    return {name: checkpoint[name] for name in checkpoint}

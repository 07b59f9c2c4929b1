"""The mapping between our parameter paths and Hugging Face Llama tensor names.

One table serves loading (HF ``(out, in)`` -> ours) and the merged export (ours -> HF); the
adapter formats (PEFT, reference DiffLoRA) build theirs from the same ``TensorMap``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from difflora_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: our path and shape, the HF name, and how many leading axes are inputs.

    ``n_in`` is 0 for tensors stored identically (norm scales, the embedding table); for a
    linear kernel it is the number of our leading input axes, and the HF tensor is
    ``[prod(out), prod(in)]`` (torch ``nn.Linear`` layout).
    """

    path: str
    hf_name: str
    shape: tuple[int, ...]
    n_in: int

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.n_in == 0:
            return self.shape
        return (math.prod(self.shape[self.n_in :]), math.prod(self.shape[: self.n_in]))

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        return tensor if self.n_in == 0 else tensor.T.reshape(self.shape)

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        if self.n_in == 0:
            return param
        return param.reshape(self.hf_shape[1], self.hf_shape[0]).T


def hf_layout(config: ModelConfig) -> dict[str, TensorMap]:
    """Every base-model parameter of ``config``, keyed by our dotted path."""
    e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    m, v = config.intermediate_size, config.vocab_size
    entries = [TensorMap("embed_tokens.embedding", "model.embed_tokens.weight", (v, e), 0)]
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        entries += [
            TensorMap(f"{ours}.input_norm.scale", f"{hf}.input_layernorm.weight", (e,), 0),
            TensorMap(f"{ours}.attn.q_proj.kernel", f"{hf}.self_attn.q_proj.weight", (e, h, d), 1),
            TensorMap(f"{ours}.attn.k_proj.kernel", f"{hf}.self_attn.k_proj.weight", (e, kv, d), 1),
            TensorMap(f"{ours}.attn.v_proj.kernel", f"{hf}.self_attn.v_proj.weight", (e, kv, d), 1),
            TensorMap(f"{ours}.attn.o_proj.kernel", f"{hf}.self_attn.o_proj.weight", (h, d, e), 2),
            TensorMap(f"{ours}.mlp_norm.scale", f"{hf}.post_attention_layernorm.weight", (e,), 0),
            TensorMap(f"{ours}.mlp.gate_proj.kernel", f"{hf}.mlp.gate_proj.weight", (e, m), 1),
            TensorMap(f"{ours}.mlp.up_proj.kernel", f"{hf}.mlp.up_proj.weight", (e, m), 1),
            TensorMap(f"{ours}.mlp.down_proj.kernel", f"{hf}.mlp.down_proj.weight", (m, e), 1),
        ]
    entries.append(TensorMap("final_norm.scale", "model.norm.weight", (e,), 0))
    if not config.tie_word_embeddings:
        entries.append(TensorMap("lm_head.kernel", "lm_head.weight", (e, v), 1))
    return {t.path: t for t in entries}

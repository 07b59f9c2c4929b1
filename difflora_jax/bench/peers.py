"""The PyTorch peers ``difflora bench --peers`` times against (CPU, float32, eager).

* ``peft_lora_step``: transformers' Llama with ``peft`` LoRA adapters (the method YAML's rank,
  alpha, dropout and targets), AdamW over the adapters, gradient clipping.
* ``torch_difflora_step``: the same Llama with each attention module replaced by
  ``TorchDiffLoRAAttention``, an eager PyTorch DiffLoRA attention written the way the paper's
  reference code computes it: Q1 = X W_Q + s X A1 B1, K1 likewise, Q2 = s X A2 B2 (the
  ``adapters`` negative term) or X W_Q + s X A2 B2 (``base_plus_adapters``), two causal
  attention calls (``scaled_dot_product_attention``, PyTorch's fused kernel; explicit maps of
  every layer would hold tens of GB for the backward pass), ``P1 V - lambda P2 V``, optional
  group norm. Its adapters can be copied from
  one of our models (``copy_adapters_from``), which is how a test checks that it computes our
  numbers.

Batches here hold no padding (one causal sequence per row), which is what the benchmarks feed.
Imported only by the benchmark; torch is needed for the peers alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.errors import ConfigError
from difflora_jax.modeling.adapters import LowRank, is_differential
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.hf_config import hf_llama_config

PEFT_MODULES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def load_torch_llama(path: Path | None, config: ModelConfig | None = None) -> Any:
    """transformers' LlamaForCausalLM in float32 from a HF directory or a ``.gguf`` file, or
    with random weights of ``config`` when that is given (a shape name)."""
    import torch
    import transformers

    if config is not None:
        hf = transformers.LlamaConfig(**hf_llama_config(config))
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(hf).float()
    if path is None:
        raise ConfigError("load_torch_llama needs a checkpoint path or a config")
    if path.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, use_safetensors=True
    )


def _train_step(model: Any, batch: dict[str, np.ndarray], learning_rate: float) -> Callable:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)
    model.train()

    def step() -> float:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def peft_lora_step(
    torch_model: Any, adapter: AdapterConfig, batch: dict[str, np.ndarray], learning_rate=1e-4
) -> tuple[Callable[[], float], int]:
    """``(step, trainable parameters)`` of PyTorch + peft LoRA with ``adapter``'s settings."""
    import peft

    if adapter.method != "lora":
        raise ConfigError(f"the peft peer runs LoRA methods, not {adapter.method!r}")
    model = peft.get_peft_model(
        torch_model,
        peft.LoraConfig(
            r=adapter.rank,
            lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft takes floats too
            lora_dropout=adapter.dropout,
            target_modules=[PEFT_MODULES[t] for t in adapter.targets],
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _train_step(model, batch, learning_rate), trainable


def _torch_difflora_class() -> type:
    import torch
    from torch import nn

    class TorchDiffLoRAAttention(nn.Module):
        """Eager DiffLoRA attention over a transformers LlamaAttention's frozen projections."""

        def __init__(self, base: Any, config: ModelConfig, adapter: AdapterConfig, layer: int):
            super().__init__()
            e, h, kv, d, r = (
                config.hidden_size,
                config.num_heads,
                config.num_kv_heads,
                config.head_dim,
                adapter.rank,
            )
            self.base, self.h, self.kv, self.d, self.scale = base, h, kv, d, adapter.scale
            self.negative_term, self.learned = adapter.negative_term, adapter.lambda_mode
            self.lambda_init = adapter.lambda_init_for(layer)
            self.dropout = nn.Dropout(adapter.dropout)

            def pair(out: int, b_bound: float | None) -> nn.ParameterList:
                a = torch.empty(e, r).uniform_(-1 / math.sqrt(e), 1 / math.sqrt(e))
                b = torch.zeros(r, out) if b_bound is None else torch.empty(r, out)
                if b_bound is not None:
                    b.uniform_(-b_bound, b_bound)
                return nn.ParameterList([nn.Parameter(a), nn.Parameter(b)])

            kaiming = 1 / math.sqrt(r) if adapter.negative_term == "adapters" else None
            self.q1, self.k1 = pair(h * d, None), pair(kv * d, None)
            self.q2, self.k2 = pair(h * d, kaiming), pair(kv * d, kaiming)
            self.lambdas = nn.Parameter(0.1 * torch.randn(4, d))
            self.group_norm = nn.Parameter(torch.ones(d)) if adapter.group_norm else None

        def _low_rank(self, x, pair):
            return (self.dropout(x) @ pair[0]) @ pair[1] * self.scale

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **_):
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            b, t, _ = hidden_states.shape
            x = hidden_states
            query, key = self.base.q_proj(x), self.base.k_proj(x)
            q1, k1 = query + self._low_rank(x, self.q1), key + self._low_rank(x, self.k1)
            q2, k2 = self._low_rank(x, self.q2), self._low_rank(x, self.k2)
            if self.negative_term == "base_plus_adapters":
                q2, k2 = query + q2, key + k2
            value = self.base.v_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
            assert position_embeddings is not None  # transformers' decoder layers pass them
            cos, sin = position_embeddings
            groups = self.h // self.kv
            value = value.repeat_interleave(groups, dim=1)
            outputs = []
            for q, k in ((q1, k1), (q2, k2)):
                q = q.view(b, t, self.h, self.d).transpose(1, 2)
                k = k.view(b, t, self.kv, self.d).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = k.repeat_interleave(groups, dim=1)
                # softmax(Q K^T / sqrt(d)) V, causal: PyTorch's own fused CPU/GPU kernel
                outputs.append(
                    torch.nn.functional.scaled_dot_product_attention(q, k, value, is_causal=True)
                )
            if self.learned == "learned":
                lq1, lk1, lq2, lk2 = self.lambdas
                lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + self.lambda_init
            else:
                lam = self.lambda_init
            # (P1 - lambda P2) V = P1 V - lambda P2 V: the two maps never materialise
            out = outputs[0] - lam * outputs[1]
            if self.group_norm is not None:
                out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5)
                out = out * self.group_norm * (1 - self.lambda_init)
            out = out.transpose(1, 2).reshape(b, t, self.h * self.d)
            return self.base.o_proj(out), None

    return TorchDiffLoRAAttention


def torch_difflora(torch_model: Any, config: ModelConfig, adapter: AdapterConfig) -> Any:
    """``torch_model`` with every attention module replaced by eager DiffLoRA attention (base
    weights frozen). Covers the positive/negative adapter terms, learned or fixed lambda and
    the group norm; refuses the extras (lora_v/o/mlp, full negative term, ReLU, layer subsets)."""
    unsupported = [
        name
        for name, on in (
            ("lora_v", adapter.lora_v),
            ("lora_o", adapter.lora_o),
            ("lora_mlp", adapter.lora_mlp),
            ("relu_on_differential", adapter.relu_on_differential),
            ("layers", adapter.layers is not None),
            ("positive_term off", not adapter.positive_term),
            ("negative_term full", adapter.negative_term == "full"),
        )
        if on
    ]
    if adapter.method != "difflora" or unsupported:
        raise ConfigError(f"the PyTorch DiffLoRA peer does not cover {unsupported or 'LoRA'}")
    attention_class = _torch_difflora_class()
    for p in torch_model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(torch_model.model.layers):
        layer.self_attn = attention_class(layer.self_attn, config, adapter, i)
    return torch_model


def torch_difflora_step(
    torch_model: Any,
    config: ModelConfig,
    adapter: AdapterConfig,
    batch: dict[str, np.ndarray],
    learning_rate=1e-4,
) -> tuple[Callable[[], float], int]:
    """``(step, trainable parameters)`` of the eager PyTorch DiffLoRA."""
    model = torch_difflora(torch_model, config, adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _train_step(model, batch, learning_rate), trainable


def copy_adapters_from(torch_model: Any, model: LlamaForCausalLM) -> None:
    """Copy our model's DiffLoRA adapters and lambda vectors into the torch peer."""
    import torch

    def matrix(x: Any) -> torch.Tensor:
        array = np.asarray(x[...], np.float32)
        return torch.from_numpy(array.reshape(array.shape[0], -1).copy())

    with torch.no_grad():
        for ours, theirs in zip(model.layers, torch_model.model.layers):
            attn, peer = ours.attn, theirs.self_attn
            if not is_differential(attn):
                raise ConfigError("copy_adapters_from needs DiffLoRA attention in every layer")
            for pair, lora in (
                (peer.q1, attn.q_proj.lora),
                (peer.k1, attn.k_proj.lora),
                (peer.q2, attn.negative_q),
                (peer.k2, attn.negative_k),
            ):
                assert isinstance(lora, LowRank)  # torch_difflora refuses the other forms
                pair[0].copy_(matrix(lora.a))
                pair[1].copy_(matrix(lora.b))
            if attn.learned_lambda:
                vectors = [attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2]
                peer.lambdas.copy_(
                    torch.from_numpy(np.stack([np.asarray(v[...]) for v in vectors]))
                )
            if attn.group_norm is not None:
                peer.group_norm.copy_(torch.from_numpy(np.array(attn.group_norm[...])))

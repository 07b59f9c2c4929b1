"""LoRA parity with Hugging Face ``peft`` on tiny transformers checkpoints.

A tiny ``transformers.LlamaForCausalLM`` is saved with ``save_pretrained`` and loaded with
``difflora_jax.load_model``; our LoRA adapters are randomised and copied into peft's
``lora_A`` / ``lora_B`` (torch layout ``[r, in]`` / ``[out, r]``); the logits must agree.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

import difflora_jax
from difflora_jax.config import AdapterConfig
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters
from tests.conftest import torch_logits

ATOL = 1e-4  # float32 on both sides, O(1) logits; observed differences are ~5e-6

# peft 0.21 calls a transformers 5 API that warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TORCH_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
OUR_NAMES = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

CASES = {
    "qvo-gate-down": dict(targets=("q", "v", "o", "gate", "down")),
    "all-rslora": dict(targets=tuple(TORCH_NAMES), use_rslora=True),
    "layers-1": dict(targets=("q", "k", "v", "o", "up"), layers=(1,)),
}
CHECKPOINTS = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


# A full row and a left-padded row (pad id 0); the batch shape of test_adapters.py, so eager
# JAX reuses that file's compiled ops.
IDS = np.array([[5, 17, 3, 42, 8, 29, 11], [0, 0, 0, 9, 103, 21, 127]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]], np.int32)


def _randomize_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    for path, var in sorted(
        ((p, v) for p, v in nnx.iter_graph(model) if isinstance(v, AdapterParam)),
        key=lambda item: item[0],
    ):
        shape = var.shape
        if path[-1] == "a":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = 0.5 * rng.standard_normal(shape) / np.sqrt(shape[0])
        var.set_value(jnp.asarray(value, jnp.float32))


def _copy_into_peft(model, peft_model, adapter, rank):
    """Our a ``[*in, r]`` -> lora_A.weight ``[r, in]``; b ``[r, *out]`` -> lora_B ``[out, r]``."""
    layers = peft_model.base_model.model.model.layers
    copied = 0
    for i, torch_layer in enumerate(layers):
        for target, torch_name in TORCH_NAMES.items():
            module = torch_layer.get_submodule(torch_name)
            has_peft = hasattr(module, "lora_A") and "default" in module.lora_A
            ours = model.layers[i]
            for part in OUR_NAMES[target].split("."):
                ours = getattr(ours, part)
            assert has_peft == (ours.lora is not None), (i, target)
            if ours.lora is None:
                continue
            assert module.scaling["default"] == pytest.approx(adapter.scale)
            a = np.asarray(ours.lora.a[...]).reshape(-1, rank).T
            b = np.asarray(ours.lora.b[...]).reshape(rank, -1).T
            with torch.no_grad():
                assert module.lora_A["default"].weight.shape == a.shape
                assert module.lora_B["default"].weight.shape == b.shape
                module.lora_A["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(a)))
                module.lora_B["default"].weight.copy_(torch.from_numpy(np.ascontiguousarray(b)))
            copied += 1
    return copied


@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_peft(tiny_llama, checkpoint, case):
    rank, alpha = 4, 8.0
    kwargs = CASES[case]
    directory, torch_base = tiny_llama(**CHECKPOINTS[checkpoint])
    model, _ = difflora_jax.load_model(directory, dtype="float32", with_tokenizer=False)
    adapter = AdapterConfig(method="lora", rank=rank, alpha=alpha, **kwargs)
    apply_adapters(model, adapter)
    _randomize_adapters(model)

    layers = kwargs.get("layers")
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=[TORCH_NAMES[t].split(".")[1] for t in kwargs["targets"]],
        use_rslora=kwargs.get("use_rslora", False),
        lora_dropout=0.0,
        init_lora_weights=True,
        layers_to_transform=list(layers) if layers else None,
        layers_pattern="layers" if layers else None,
    )
    peft_model = get_peft_model(copy.deepcopy(torch_base), peft_config).eval()
    num_layers = model.config.num_layers
    expected = len(kwargs["targets"]) * (len(layers) if layers else num_layers)
    assert _copy_into_peft(model, peft_model, adapter, rank) == expected

    ids, mask = IDS, MASK
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(peft_model, ids, mask)
    base = torch_logits(torch_base, ids, mask)
    real = mask.astype(bool)
    # Not vacuous: the adapters change the logits by far more than the tolerance.
    assert np.abs(theirs[real] - base[real]).max() > 100 * ATOL
    diff = np.abs(ours[real] - theirs[real]).max()
    assert diff <= ATOL, f"max |ours - peft| = {diff:.3g}"

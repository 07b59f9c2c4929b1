"""Fixtures for the interchange-format tests: a LoRA adapter trained here on a tiny Llama
directory, adapter checkpoints written as the training loop writes them, random adapters."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.adapter_checkpoint import Checkpointer, base_model_record, flatten
from difflora_jax.config import AdapterConfig, to_dict
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters
from difflora_jax.training import make_optimizer
from difflora_jax.training.config import DataConfig, OptimizerConfig, TrainConfig
from difflora_jax.training.step import split_for_training
from difflora_jax.weights.loading import load_model

ATOL = 1e-4  # float32 on both sides, O(1) logits
# A full row and a left-padded row (pad id 0), as in tests/modeling.
IDS = np.array([[5, 17, 3, 42, 8, 29, 11], [0, 0, 0, 9, 103, 21, 127]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]], np.int32)
REAL = MASK.astype(bool)

TRAINED_LORA = AdapterConfig(
    method="lora",
    rank=4,
    alpha=8.0,
    use_rslora=True,
    targets=("q", "k", "v", "o", "gate", "down"),
)


def logits(model, ids=IDS, mask=MASK) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def max_diff(a, b) -> float:
    return float(np.abs(a[REAL] - b[REAL]).max())


def adapter_values(model) -> dict[str, np.ndarray]:
    """Every adapter parameter of a model, flat dotted path -> numpy."""
    return {
        k: np.asarray(v)
        for k, v in flatten(nnx.to_pure_dict(nnx.state(model, AdapterParam))).items()
    }


def randomize_adapters(model, seed=1, *, mirror_lambda=False):
    """Random O(1)-effect values for every adapter parameter (B = 0 would hide the terms).

    ``mirror_lambda``: lambda_q2 = lambda_q1 and lambda_k2 = lambda_k1, so lambda = exp(q1.k1)
    - exp(q2.k2) + lambda_init is exactly lambda_init.
    """
    rng = np.random.default_rng(seed)
    variables = sorted(
        (
            (".".join(str(p) for p in path), v)
            for path, v in nnx.iter_graph(model)
            if isinstance(v, AdapterParam)
        ),
        key=lambda item: item[0],
    )
    values = {}
    for name, var in variables:
        shape, leaf = var.shape, name.rsplit(".", 1)[-1]
        if leaf == "a":
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        elif leaf == "b":
            value = 0.5 * rng.standard_normal(shape) / math.sqrt(shape[0])
        elif leaf == "kernel":
            value = rng.standard_normal(shape) / math.sqrt(shape[0])
        elif leaf.startswith("lambda_"):
            value = 0.15 * rng.standard_normal(shape)
        else:  # group norm scale
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        values[name] = value
    if mirror_lambda:
        for name in list(values):
            if name.endswith(("lambda_q2", "lambda_k2")):
                values[name] = values[name[:-1] + "1"]
    for name, var in variables:
        var.set_value(jnp.asarray(values[name], jnp.float32))


def save_checkpoint(model, directory, source, step=7):
    """An adapter checkpoint of ``model``'s adapters, written as the training loop writes one."""
    _, params, rng, _ = split_for_training(model)
    opt_state = make_optimizer(OptimizerConfig(total_steps=10)).init(params)
    with Checkpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(
            step,
            params=params,
            opt_state=opt_state,
            rng=rng,
            meta={
                "adapter_config": to_dict(model.adapter_config),
                "base_model": base_model_record(model, source),
                "data_state": None,
            },
        )
    jax.block_until_ready(params)
    return directory


def adapted_checkpoint(base_dir, directory, adapter, *, seed=1, mirror_lambda=False):
    """``(model, checkpoint)``: the base model of ``base_dir`` with random ``adapter`` values."""
    model, _ = load_model(base_dir, with_tokenizer=False)
    apply_adapters(model, adapter)
    randomize_adapters(model, seed, mirror_lambda=mirror_lambda)
    return model, save_checkpoint(model, directory, str(base_dir))


@pytest.fixture(scope="session")
def trained_lora(tiny_llama, tmp_path_factory):
    """``(base directory, torch base model, run directory, trained model)``: a LoRA adapter
    (rsLoRA, six targets) trained here for 3 steps on random tokens with a high rate, so it
    moves the logits far more than any tolerance."""
    from difflora_jax.training import train

    directory, torch_model = tiny_llama()
    config = TrainConfig(
        model=str(directory),
        method=to_dict(TRAINED_LORA),
        output_dir=str(tmp_path_factory.mktemp("lora_run") / "run"),
        dtype="float32",
        data=DataConfig(source="random", max_length=16),
        batch_size=2,
        max_steps=3,
        learning_rate=0.05,
        warmup_ratio=0.0,
        save_every=3,
    )
    result = train(config, progress=False)
    return directory, torch_model, result.run_dir, result.model

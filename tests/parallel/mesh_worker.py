"""Run in a subprocess with 8 CPU devices (``python -m tests.parallel.mesh_worker METHOD``):
train a tiny model 3 steps on each mesh of ``MESHES`` and on one device, and print one JSON
object: per mesh the losses and per-step adapter gradients' largest difference from the
single-device run, every array whose sharding is not what the rules say, and the all-gathers
of whole stacked layer weights in the compiled step."""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import dataclasses
import json
import math
import re

import jax
import numpy as np
import optax
from flax import nnx

from difflora_jax.adapter_checkpoint import flatten
from difflora_jax.catalog import load_method
from difflora_jax.modeling.adapters import AdapterParam
from difflora_jax.parallel import MeshConfig, make_mesh, make_rules, sharding_of, use_mesh
from difflora_jax.parallel.shard import global_batch, init_optimizer, shard_model
from difflora_jax.training.config import OptimizerConfig
from difflora_jax.training.loop import reseed_dropout
from difflora_jax.training.optimizer import make_optimizer
from difflora_jax.training.step import ShardedStep, compute_gradients, split_for_training
from tests.tiny import random_batch, tiny_config, tiny_model

# Every dimension the rules split divides 4: heads 8, kv heads 4 (grouped-query), MLP 96,
# vocabulary 128, model dimension 64.
CONFIG = tiny_config(num_heads=8, num_kv_heads=4, head_dim=8, num_layers=3)
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
METHODS = {"lora": "lora-r8", "difflora-32-gn": "difflora-32-gn"}


def _layer_weight_shapes(model) -> set[tuple[int, ...]]:
    """The whole stacked shape ``[layers, ...]`` of every frozen matrix of the layers."""
    n = len(model.layers)
    shapes = set()
    for _, variable in nnx.to_flat_state(nnx.state(model.layers[0], nnx.Param)):
        if isinstance(variable, AdapterParam) or variable.get_value().ndim < 2:
            continue
        shapes.add((n, *variable.get_value().shape))
    return shapes


def _wrong_shardings(model, params, rest, opt_state, tx, mesh, rules) -> list[str]:
    wrong = []
    expected = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        value = variable.get_value()
        axes = getattr(variable, "logical_axes", None)
        expected[path] = sharding_of(np.shape(value), axes, mesh, rules)
    for tree in (params, rest):
        for path, x in nnx.to_flat_state(nnx.State(tree)):
            want = expected[tuple(path)]
            if not x.sharding.is_equivalent_to(want, x.ndim):
                wrong.append(f"{'.'.join(map(str, path))}: {x.sharding.spec} != {want.spec}")
    pairs = []  # (optimizer entry, its parameter or None)
    optax.tree_map_params(
        tx,
        lambda entry, param: pairs.append((entry, param)),
        opt_state,
        params,
        transform_non_params=lambda entry: pairs.append((entry, None)),
    )
    for entry, param in pairs:
        want = param.sharding if param is not None else sharding_of((), None, mesh, rules)
        if not entry.sharding.is_equivalent_to(want, entry.ndim):
            wrong.append(f"optimizer entry {entry.shape}: {entry.sharding.spec}")
    return wrong


def run(method: str, shape: tuple[int, int, int], accum: int = 1) -> dict:
    adapter = dataclasses.replace(load_method(METHODS[method]))
    model = tiny_model(adapter, config=CONFIG)
    reseed_dropout(model, 0)
    mesh = make_mesh(MeshConfig(*shape), devices=jax.devices()[: math.prod(shape)])
    rules = make_rules()
    shard_model(model, mesh, rules)
    graphdef, params, rng, rest = split_for_training(model)
    optimizer = OptimizerConfig(learning_rate=1e-2, total_steps=10)
    tx = make_optimizer(optimizer)
    opt_state = init_optimizer(tx, params, mesh)
    wrong = _wrong_shardings(model, params, rest, opt_state, tx, mesh, rules)
    step = ShardedStep(
        graphdef,
        optimizer,
        accum,
        mesh,
        rules,
        params=params,
        opt_state=opt_state,
        rng=rng,
        rest=rest,
    )
    grads_fn = jax.jit(compute_gradients, static_argnums=(0, 5))
    losses, grads = [], []
    for i in range(3):
        batch = global_batch(
            random_batch(8, 32, vocab=CONFIG.vocab_size, seed=i), step.batch_sharding
        )
        if i == 0:
            hlo = step.lower(params, opt_state, rng, rest, batch).compile().as_text()
        with use_mesh(mesh, rules):
            g, _, _, _ = grads_fn(graphdef, params, rng, rest, batch, accum)
        params, opt_state, rng, metrics = step(params, opt_state, rng, rest, batch)
        losses.append(float(metrics["loss"]))
        grads.append({k: np.asarray(v) for k, v in flatten(g).items()})
    stacked = _layer_weight_shapes(model)
    single = {shape[1:] for shape in stacked}
    gathers, per_layer = [], 0
    for line in hlo.splitlines():
        match = re.search(r"= \w+\[([0-9,]*)\]\S* all-gather(-start)?\(", line)
        if not match:
            continue
        shape = tuple(int(d) for d in match.group(1).split(",") if d)
        # a whole or partly gathered stack of layer weights: [layers, ...] with a weight's rank
        # (no activation or other weight has a dimension of CONFIG.num_layers = 3)
        if shape and shape[0] == CONFIG.num_layers and any(len(w) == len(shape) for w in stacked):
            gathers.append(line.strip()[:160])
        per_layer += shape in single
    return {
        "losses": losses,
        "grads": grads,
        "wrong": wrong,
        "gathers": gathers,
        "layer_gathers": per_layer,
    }


def main() -> None:
    method = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    results = {"x".join(map(str, shape)): run(method, shape) for shape in MESHES}
    # gradient accumulation on a mesh (two micro-batches of 4 rows, each split over 4 devices)
    # against accumulation on one device (dropout draws per micro-batch, so not against 1x1x1)
    accumulated = {
        "1x1x1-accum2": run(method, (1, 1, 1), accum=2),
        "2x2x2-accum2": run(method, (2, 2, 2), accum=2),
    }
    out = {}
    for shape, r in [*results.items(), *accumulated.items()]:
        ref = results["1x1x1"] if shape in results else accumulated["1x1x1-accum2"]
        grad_diff = max(
            float(np.max(np.abs(g[k] - rg[k])))
            for g, rg in zip(r["grads"], ref["grads"])
            for k in g
        )
        out[shape] = {
            "losses": r["losses"],
            "loss_diff": max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])),
            "grad_diff": grad_diff,
            "grad_scale": max(float(np.max(np.abs(v))) for g in ref["grads"] for v in g.values()),
            "wrong_shardings": r["wrong"],
            "stacked_gathers": r["gathers"],
            "layer_weight_gathers": r["layer_gathers"],
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()

"""``difflora plan``: will a training run fit? Compile the sharded train step for a model shape,
method, mesh, batch and sequence length without any weights (abstract shapes on fake CPU
devices) and read the per-device memory and the FLOPs from XLA.

Per device: ``param_bytes`` (frozen base weights as sharded), ``adapter_bytes`` (trainable
adapters), ``optimizer_bytes`` (AdamW moments, float32), ``batch_bytes`` and ``temp_bytes``
(XLA's temporaries of the compiled step: activations kept for the backward pass, gradients,
workspaces; from ``compiled.memory_analysis()``). ``total_bytes`` adds them: the state is
donated on accelerators, so the step's outputs reuse its inputs' buffers. ``fits``: total <=
``device_memory``. ``flops_per_step``: the model FLOPs of the step by the formula of
``modeling/flops.py`` (XLA's own count, ``xla_flops_per_device``, sees a scanned layer loop's
body once, not once per layer). The temporaries are those of XLA:CPU's schedule of the same program; an
accelerator's compiler schedules differently, so read them as an estimate (the parameter,
adapter and optimizer bytes are exact).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from difflora_jax.catalog import load_method, model_shape
from difflora_jax.config import AdapterConfig, ModelConfig
from difflora_jax.errors import ConfigError
from difflora_jax.losses import BATCH_KEYS
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters, count_adapter_params
from difflora_jax.modeling.flops import train_step_flops
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.parallel import MeshConfig, make_mesh, make_rules
from difflora_jax.parallel.shard import (
    batch_sharding,
    optimizer_shardings,
    shardings_of,
    state_shardings,
)
from difflora_jax.training.config import OptimizerConfig
from difflora_jax.training.layout import scanned_runs, stack_layers, stack_sharding
from difflora_jax.training.optimizer import make_optimizer
from difflora_jax.training.step import ShardedStep, split_for_training
from difflora_jax.weights.loading import DTYPES

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str) -> int:
    """``16GiB``, ``80GB``, ``1.5TiB``, ``1024`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(f"device memory {text!r} is not a size like 16GiB, 80GB or 1024")
    return int(float(match.group(1)) * _UNITS[unit])


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree`` (abstract arrays carrying their shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def plan(
    model: str | ModelConfig,
    method: str | AdapterConfig,
    *,
    mesh: MeshConfig,
    batch: int,
    seq_len: int,
    dtype: str = "bfloat16",
    remat: str = "none",
    scan: bool = True,
    grad_accum_steps: int = 1,
    device_memory: int | None = None,
    sharding_rules: dict | None = None,
) -> dict[str, Any]:
    """The plan of one configuration on the devices JAX sees (see the module docstring)."""
    start = time.perf_counter()
    config = model_shape(model) if isinstance(model, str) else model
    adapter = load_method(method) if isinstance(method, str) else method
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    rules = make_rules(sharding_rules)
    device_mesh = make_mesh(mesh)

    def build() -> LlamaForCausalLM:
        m = LlamaForCausalLM(config, dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
        return apply_adapters(m, adapter)

    abstract = nnx.eval_shape(build)
    abstract.set_layer_execution(scan=scan, remat=remat)
    shardings = state_shardings(nnx.state(abstract), device_mesh, rules)
    graphdef, params, rng, rest = split_for_training(abstract)
    # the shardings, split into the same pure-dict trees as the state
    sh_params, sh_rng, sh_rest = (
        nnx.to_pure_dict(part)
        for part in nnx.split_state(shardings, AdapterParam, nnx.RngState, ...)
    )
    # the training loop's layout: each scanned run's adapters and dropout streams stacked
    runs = scanned_runs(abstract)
    params, rng = _with_shardings(
        jax.eval_shape(lambda t: stack_layers(t, runs), (params, rng)),
        stack_layers((sh_params, sh_rng), runs, stack_sharding),
    )
    rest = _with_shardings(rest, sh_rest)
    optimizer = OptimizerConfig(total_steps=1000)
    tx = make_optimizer(optimizer)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_state = _with_shardings(
        opt_abstract,
        optimizer_shardings(tx, opt_abstract, shardings_of(params), device_mesh),
    )
    step = ShardedStep(
        graphdef,
        optimizer,
        grad_accum_steps,
        device_mesh,
        rules,
        params=params,
        opt_state=opt_state,
        rng=rng,
        rest=rest,
    )
    rows = batch_sharding(device_mesh, rules)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows)
    batch_arrays = dict.fromkeys(BATCH_KEYS, tokens)
    compiled = step.lower(params, opt_state, rng, rest, batch_arrays).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    sizes = {
        "param_bytes_per_device": _shard_bytes(rest),
        "adapter_bytes_per_device": _shard_bytes(params),
        "optimizer_bytes_per_device": _shard_bytes(opt_state),
        "batch_bytes_per_device": _shard_bytes(batch_arrays),
        "temp_bytes_per_device": 0 if memory is None else int(memory.temp_size_in_bytes),
    }
    total = sum(sizes.values())
    devices = device_mesh.devices.size
    return {
        "model": config.name or "custom",
        "method": adapter.method if isinstance(method, AdapterConfig) else method,
        "mesh": dict(zip(device_mesh.axis_names, device_mesh.devices.shape)),
        "devices": devices,
        "batch": batch,
        "seq_len": seq_len,
        "dtype": dtype,
        "remat": remat,
        "base_params": config.num_params,
        "adapter_params": count_adapter_params(abstract),
        **sizes,
        "total_bytes_per_device": total,
        "flops_per_step": train_step_flops(abstract, batch, seq_len),
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else 0.0,
        "device_memory": device_memory,
        "fits": None if device_memory is None else total <= device_memory,
        "compile_s": round(time.perf_counter() - start, 1),
    }


# Set in the child process that ``in_subprocess`` starts, so it does not start another.
CHILD_ENV = "DIFFLORA_PLAN_CHILD"


def in_subprocess(argv: Sequence[str], devices: int) -> int:
    """Run ``difflora`` with ``argv`` in a child process on ``devices`` fake CPU devices (the
    device count of a JAX process is fixed when it starts); returns its exit status."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    command = [
        sys.executable,
        "-c",
        "import sys; from difflora_jax.cli import main; sys.exit(main())",
    ]
    return subprocess.run([*command, *argv], env=env, check=False).returncode


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def render(result: dict[str, Any]) -> str:
    """The plan as a few readable lines."""
    mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [
        f"{result['model']} ({result['base_params']:,} parameters), {result['method']} "
        f"({result['adapter_params']:,} trainable), {result['dtype']} base weights",
        f"mesh {mesh} ({result['devices']} devices), batch {result['batch']} x "
        f"{result['seq_len']} tokens, remat {result['remat']}",
        "per device:",
    ]
    for key, label in (
        ("param_bytes_per_device", "base weights"),
        ("adapter_bytes_per_device", "adapters"),
        ("optimizer_bytes_per_device", "optimizer state"),
        ("batch_bytes_per_device", "batch"),
        ("temp_bytes_per_device", "temporaries (XLA)"),
        ("total_bytes_per_device", "total"),
    ):
        lines.append(f"  {label:<20} {_gib(result[key]):>14}")
    lines.append(
        f"model FLOPs per step: {result['flops_per_step']:.3e} (modeling/flops.py; "
        f"{result['flops_per_step'] / result['devices']:.3e} per device)"
    )
    if result["device_memory"] is not None:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {_gib(result['device_memory'])} per device")
    lines.append(f"(compiled in {result['compile_s']} s)")
    return "\n".join(lines)

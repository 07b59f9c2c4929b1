"""``difflora plan``: the sharded step compiled without weights on fake CPU devices reports
exact per-device parameter bytes, says when a configuration does not fit, and refuses a mesh
that does not divide a dimension."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from difflora_jax.catalog import model_shape
from difflora_jax.training.plan import parse_bytes


def _difflora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from difflora_jax.cli import main; sys.exit(main())"]
        + list(args),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_plan_of_llama_8b_on_8_devices():
    proc = _difflora(
        "plan", "--model", "llama-3.1-8b", "--method", "difflora-32-gn", "--mesh", "fsdp=8",
        "--devices", "8", "--batch", "8", "--seq-len", "4096", "--dtype", "bfloat16",
        "--device-memory", "16GiB", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    config = model_shape("llama-3.1-8b")
    # Every matrix is split 8 ways over fsdp (its embed axis); the RMSNorm scales (2 per layer
    # and the final one) are replicated, as is each layer's float32 lambda_init constant.
    norms = (2 * config.num_layers + 1) * config.hidden_size
    expected = (config.num_params - norms) * 2 // 8 + norms * 2 + 4 * config.num_layers
    assert plan["param_bytes_per_device"] == expected
    assert plan["base_params"] == 8_030_261_248
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # float32 adapters, two float32 Adam moments per adapter entry
    assert plan["adapter_bytes_per_device"] >= plan["adapter_params"] * 4 // 8
    assert plan["optimizer_bytes_per_device"] >= 2 * plan["adapter_bytes_per_device"]
    assert plan["temp_bytes_per_device"] > 0 and plan["flops_per_step"] > 0
    # without remat the two attention maps of every layer are kept: far beyond 16 GiB
    assert plan["total_bytes_per_device"] > parse_bytes("16GiB")
    assert plan["fits"] is False


def test_plan_refuses_a_mesh_that_does_not_divide_a_dimension():
    # SmolLM2 has 3 key/value heads: 2-way tensor parallelism cannot split them
    proc = _difflora(
        "plan", "--model", "smollm2-135m", "--mesh", "tensor=2", "--devices", "2",
        "--batch", "2", "--seq-len", "64",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "kv_heads" in proc.stderr and "size 3" in proc.stderr and "tensor" in proc.stderr


@pytest.mark.parametrize(
    "text, value", [("16GiB", 16 * 2**30), ("80GB", 80 * 10**9), ("1024", 1024), ("1.5KiB", 1536)]
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value

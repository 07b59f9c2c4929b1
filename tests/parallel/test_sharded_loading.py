"""Safetensors and GGUF checkpoints load straight into shards: the same logits and generations as the
unsharded load on three meshes (also with the prompts and the KV cache split by rows), and no process reads more than its share of the tensor bytes
(counted by the reader)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import tiny_config, tiny_model, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# every dimension the meshes split divides 8 (fsdp) and 4 (tensor): 8 heads, 4 KV heads
CONFIG = tiny_config(num_heads=8, num_kv_heads=4, head_dim=8, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sharded") / "model"
    write_hf_checkpoint(directory, tiny_model(None, config=CONFIG))
    return directory


def _worker(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.parallel.load_worker", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, err[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_sharded_load_equals_the_unsharded_load(checkpoint):
    result = _result(_worker("single", str(checkpoint)))
    for mesh in ("1x8x1", "1x2x4", "2x2x2"):
        r = result[mesh]
        assert r["logit_diff"] <= 1e-5, (mesh, r)
        assert r["same_generation"], mesh
        assert r["same_generation_rows_split"], mesh  # prompts and KV cache split by rows
        # replicated shards are read once: each byte of the file exactly once
        assert r["bytes_read"] == result["file_bytes"], (mesh, r)
    # q_proj kernel [embed 64, heads 8, head_dim 8]: embed over fsdp, heads over tensor
    assert result["1x8x1"]["q_kernel_shard"] == [8, 8, 8]
    assert result["1x2x4"]["q_kernel_shard"] == [32, 2, 8]
    assert result["2x2x2"]["q_kernel_shard"] == [32, 4, 8]
    # trained adapters restored straight into shards: every template Orbax filled was already
    # placed on the mesh, and the sharded model with them gives the unsharded logits
    adapter = result["adapter"]
    assert adapter["templates_on_mesh"] and adapter["single_device_templates"] == 0, adapter
    assert adapter["q_lora_b_devices"] == 8
    assert adapter["logit_diff"] <= 1e-5, adapter


def test_two_processes_each_read_only_their_share(checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [_worker("multi", str(checkpoint), address, str(i)) for i in range(2)]
    results = [_result(p) for p in procs]
    for r in results:
        assert r["processes"] == 2
        # half of every matrix (fsdp=8 over 2 x 4 devices) plus the replicated norm scales
        assert r["bytes_read"] == r["share"] < 0.6 * r["file_bytes"], r
        assert r["q_kernel_shard"] == [8, 8, 8]


def test_gguf_loads_into_shards():
    """SmolLM2-135M-Instruct's GGUF (Q4_1 / Q8_0 blocks): sharded over fsdp=8 (columns) and
    tensor=3 (rows, whole Q/K heads) it gives the unsharded logits, and each quantized row is
    read once (blocks for other columns reuse the dequantized rows)."""
    result = _result(_worker("gguf", "-"))
    for mesh in ("1x8x1", "1x1x3"):
        r = result[mesh]
        # float32 sums in another order over 30 layers: 1e-5 of the largest logit
        assert r["logit_diff"] <= 1e-5 * result["logit_scale"] + 1e-4, (mesh, r)
        assert r["bytes_read"] == result["tensor_bytes"], (mesh, r)

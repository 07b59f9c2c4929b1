"""Sharded safetensors loading, run in subprocesses (the device count is fixed at JAX start).

``single DIR``: one process, 8 CPU devices: on meshes 1x8x1, 1x2x4 and 2x2x2 the sharded
load gives the unsharded load's logits and greedy generations, and reads each tensor byte
once. ``multi DIR ADDRESS ID``: one of two processes x 4 devices on mesh 1x8x1: how many
tensor bytes this process read, against its share. Prints ``RESULT {json}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from difflora_jax.generation import generate_ids
from difflora_jax.parallel import DEFAULT_RULES, MeshConfig, initialize_distributed, make_mesh
from difflora_jax.weights.gguf_io import model_config_from_gguf as build_config
from difflora_jax.weights.hf_config import read_hf_config
from difflora_jax.weights.layout import hf_layout
from difflora_jax.weights.loading import build_model
from difflora_jax.weights.safetensors_io import SafetensorsCheckpoint


def _load(directory: Path, mesh=None):
    checkpoint = SafetensorsCheckpoint(directory)
    model = build_model(read_hf_config(directory), checkpoint, mesh=mesh, rules=DEFAULT_RULES)
    return model, checkpoint.bytes_read


def _file_bytes(directory: Path, per_process: int = 1) -> int:
    """Tensor bytes of the checkpoint; with ``per_process`` > 1, one process's share when
    every matrix is split evenly over the processes and vectors are replicated."""
    checkpoint = SafetensorsCheckpoint(directory)
    total = 0
    for entry in hf_layout(read_hf_config(directory)).values():
        n = int(np.prod(checkpoint.shape_of(entry.hf_name))) * 4  # float32 files
        total += n if len(entry.shape) < 2 else n // per_process
    return total


def single(directory: Path) -> dict:
    ids = np.random.default_rng(0).integers(0, 128, (4, 24)).astype(np.int32)
    reference, _ = _load(directory)
    want = np.asarray(reference(ids))
    want_tokens = generate_ids(reference, ids[:, :10].tolist(), max_new_tokens=8)
    out = {"file_bytes": _file_bytes(directory)}
    for shape in [(1, 8, 1), (1, 2, 4), (2, 2, 2)]:
        mesh = make_mesh(MeshConfig(*shape))
        model, read = _load(directory, mesh)
        kernel = model.layers[0].attn.q_proj.kernel[...]
        rows_split = generate_ids(model, ids[:, :10].tolist(), max_new_tokens=8, mesh=mesh)
        out["x".join(map(str, shape))] = {
            "logit_diff": float(np.max(np.abs(np.asarray(model(ids)) - want))),
            "same_generation": generate_ids(model, ids[:, :10].tolist(), max_new_tokens=8)
            == want_tokens,
            "same_generation_rows_split": rows_split == want_tokens,
            "bytes_read": read,
            "q_kernel_shard": list(kernel.sharding.shard_shape(kernel.shape)),
        }
    out["adapter"] = _adapter_into_shards(directory, ids)
    return out


def _adapter_into_shards(directory: Path, ids: np.ndarray) -> dict:
    """Trained DiffLoRA adapters saved from the unsharded model, restored onto a sharded load
    (mesh 1x2x4): the logits against the unsharded model's, and the shardings of the arrays
    Orbax restored into (the templates handed to ``Checkpointer.restore``)."""
    import tempfile

    from difflora_jax import adapter_checkpoint as ac
    from difflora_jax.modeling.adapters import adapter_arrays, apply_adapters, write_back
    from tests.tiny import DIFFLORA

    reference, _ = _load(directory)
    apply_adapters(reference, DIFFLORA)
    rng = np.random.default_rng(1)
    write_back(
        reference,
        jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32),
                     adapter_arrays(reference)),
    )  # fmt: skip
    want = np.asarray(reference(ids))
    seen: list[str] = []
    original = ac.Checkpointer.restore

    def spy(self, step=None, *, params, **kwargs):
        seen.extend(str(getattr(x, "sharding", None)) for x in jax.tree.leaves(params))
        return original(self, step, params=params, **kwargs)

    ac.Checkpointer.restore = spy
    mesh = make_mesh(MeshConfig(1, 2, 4))
    with tempfile.TemporaryDirectory() as tmp:
        ac.save_adapter_checkpoint(reference, tmp, source=str(directory))
        model, _ = _load(directory, mesh)
        ac.load_adapter(model, tmp, mesh=mesh, rules=DEFAULT_RULES)
    lora_b = model.layers[0].attn.q_proj.lora.b[...]
    return {
        "logit_diff": float(np.max(np.abs(np.asarray(model(ids)) - want))),
        "templates_on_mesh": bool(seen) and all("NamedSharding" in s for s in seen),
        "single_device_templates": sum("SingleDeviceSharding" in s for s in seen),
        "q_lora_b_devices": len(lora_b.sharding.device_set),
    }


def gguf() -> dict:
    """The real SmolLM2 GGUF, sharded (fsdp=8; tensor=3, splitting its 3 KV heads) against the
    unsharded load; file bytes read against the file's tensor bytes."""
    from difflora_jax.weights.gguf_io import GGUFCheckpoint, open_gguf
    from difflora_jax.weights.loading import resolve_source

    path = resolve_source("smollm2-135m-instruct")
    reader = open_gguf(path)
    config = build_config(reader, path)
    ids = np.asarray([[1, 504, 3575, 282, 4649, 314]], np.int32)
    reference = build_model(config, GGUFCheckpoint(reader, config, path))
    want = np.asarray(reference(ids))
    tensor_bytes = sum(int(t.data.nbytes) for t in reader.tensors if t.name != "rope_freqs.weight")
    out: dict = {"tensor_bytes": tensor_bytes, "logit_scale": float(np.abs(want).max())}
    for shape, count in (((1, 8, 1), 8), ((1, 1, 3), 3)):
        checkpoint = GGUFCheckpoint(reader, config, path)
        mesh = make_mesh(MeshConfig(*shape), devices=jax.devices()[:count])
        model = build_model(config, checkpoint, mesh=mesh, rules=DEFAULT_RULES)
        out["x".join(map(str, shape))] = {
            "logit_diff": float(np.abs(np.asarray(model(ids)) - want).max()),
            "bytes_read": checkpoint.bytes_read,
        }
    return out


def multi(directory: Path, address: str, process_id: int) -> dict:
    initialize_distributed(address, 2, process_id, local_device_count=4)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    model, read = _load(directory, mesh)
    kernel = model.layers[0].attn.q_proj.kernel[...]
    return {
        "processes": jax.process_count(),
        "bytes_read": read,
        "share": _file_bytes(directory, per_process=2),
        "file_bytes": _file_bytes(directory),
        "q_kernel_shard": list(kernel.sharding.shard_shape(kernel.shape)),
    }


if __name__ == "__main__":
    mode, directory = sys.argv[1], Path(sys.argv[2])
    if mode == "single":
        jax.config.update("jax_num_cpu_devices", 8)
        result = single(directory)
    elif mode == "gguf":
        jax.config.update("jax_num_cpu_devices", 8)
        result = gguf()
    else:
        result = multi(directory, sys.argv[3], int(sys.argv[4]))
    print("RESULT " + json.dumps(result))

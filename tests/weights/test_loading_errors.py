"""Bad checkpoints and arguments end in a clear error that names the problem; good sharded ones load."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import difflora_jax
from difflora_jax.errors import AssetNotFoundError, CheckpointError, ConfigError
from tests.conftest import save_tiny_llama, torch_logits

ATOL = 1e-4


@pytest.fixture
def checkpoint(tiny_llama, tmp_path):
    """A private copy of the tiny GQA, untied checkpoint, free to edit."""
    source, _ = tiny_llama()
    directory = tmp_path / "checkpoint"
    shutil.copytree(source, directory)
    return directory


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# sources that do not resolve


def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(AssetNotFoundError, match="does not exist") as info:
        difflora_jax.load_model(missing)
    assert str(missing) in str(info.value)


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "model.gguf"
    with pytest.raises(AssetNotFoundError, match="does not exist") as info:
        difflora_jax.load_model(str(missing))
    assert "model.gguf" in str(info.value)


def test_unknown_alias():
    with pytest.raises(AssetNotFoundError) as info:
        difflora_jax.load_model("llama-9-unknown")
    message = str(info.value)
    assert "'llama-9-unknown'" in message
    assert "alias" in message
    assert "smollm2-135m-instruct" in message  # lists the known ones


def test_file_that_is_neither_directory_nor_gguf(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"neither a model directory nor a \.gguf file"):
        difflora_jax.load_model(path)


@pytest.mark.parametrize("dtype", ["float16", "fp32", "int8", None])
def test_invalid_dtype(checkpoint, dtype):
    with pytest.raises(ConfigError) as info:
        difflora_jax.load_model(checkpoint, dtype=dtype)
    message = str(info.value)
    assert f"dtype={dtype!r}" in message
    assert "bfloat16" in message and "float32" in message  # the allowed values


@pytest.mark.parametrize(
    "adapter, error, message",
    [
        ("{tmp}/no/such/dir", CheckpointError, "no such directory"),
        ("./no-such-run", CheckpointError, "no such directory"),
        ("{tmp}/missing.yaml", ConfigError, "config file not found"),
        ("difflora-999", ConfigError, "unknown method 'difflora-999'"),
    ],
)
def test_adapter_that_is_neither_a_checkpoint_nor_a_method(
    checkpoint, tmp_path, adapter, error, message
):
    with pytest.raises(error, match=message) as info:
        difflora_jax.load_model(checkpoint, adapter=adapter.format(tmp=tmp_path))
    if error is CheckpointError:
        assert "unknown method" not in str(info.value)


def test_invalid_dtype_is_checked_before_the_source(tmp_path):
    with pytest.raises(ConfigError, match="dtype"):
        difflora_jax.load_model(tmp_path / "missing", dtype="float16")


# ---------------------------------------------------------------------------------------------
# config.json


def test_directory_without_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        difflora_jax.load_model(checkpoint)


def test_non_llama_architecture(tmp_path):
    directory = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "gpt2"
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(directory)
    message = str(info.value)
    assert "unsupported architecture" in message
    assert "'gpt2'" in message and "GPT2LMHeadModel" in message
    assert "config.json" in message


def test_config_json_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        difflora_jax.load_model(checkpoint)


def test_config_json_missing_field(checkpoint):
    path = checkpoint / "config.json"
    raw = json.loads(path.read_text())
    del raw["num_hidden_layers"]
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'num_hidden_layers'"):
        difflora_jax.load_model(checkpoint)


def test_config_json_bad_kv_heads(checkpoint):
    path = checkpoint / "config.json"
    raw = json.loads(path.read_text())
    raw["num_key_value_heads"] = 3  # does not divide 4 heads
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'num_kv_heads' = 3"):
        difflora_jax.load_model(checkpoint)


# ---------------------------------------------------------------------------------------------
# tensors that do not fit the config


def test_shape_mismatch_names_tensor_and_shapes(checkpoint):
    name = "model.layers.1.self_attn.k_proj.weight"  # [kv_heads * head_dim, hidden] = (32, 64)

    def edit(tensors):
        assert tensors[name].shape == (32, 64)
        tensors[name] = np.zeros((16, 64), np.float32)

    _edit_tensors(checkpoint, edit)
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    message = str(info.value)
    assert repr(name) in message
    assert "(16, 64)" in message  # found
    assert "(32, 64)" in message  # expected


def test_transposed_tensor_is_a_shape_mismatch(checkpoint):
    name = "model.layers.0.mlp.down_proj.weight"  # (hidden, intermediate) = (64, 96)
    _edit_tensors(checkpoint, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    message = str(info.value)
    assert repr(name) in message and "(96, 64)" in message and "(64, 96)" in message


def test_missing_tensor(checkpoint):
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_tensors(checkpoint, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    message = str(info.value)
    assert repr(name) in message
    assert "lacks 1 tensor" in message


def test_missing_lm_head_of_untied_model(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight'"):
        difflora_jax.load_model(checkpoint)


def test_unexpected_extra_tensor(checkpoint):
    name = "model.layers.0.self_attn.q_norm.weight"  # a Qwen3-style tensor Llama has no use for
    _edit_tensors(checkpoint, lambda t: t.__setitem__(name, np.ones(16, np.float32)))
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    message = str(info.value)
    assert repr(name) in message
    assert "does not use" in message


def test_non_finite_tensor(checkpoint):
    name = "model.norm.weight"

    def edit(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][3] = np.nan

    _edit_tensors(checkpoint, edit)
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    assert repr(name) in str(info.value) and "NaN" in str(info.value)


def test_integer_tensor(checkpoint):
    name = "model.layers.0.input_layernorm.weight"
    _edit_tensors(checkpoint, lambda t: t.__setitem__(name, np.ones(64, np.int32)))
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    assert repr(name) in str(info.value) and "int32" in str(info.value)


# ---------------------------------------------------------------------------------------------
# corrupt or unsupported files


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(checkpoint, corruption):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    if corruption == "garbage":
        data = np.random.default_rng(0).bytes(4096)
    elif corruption == "truncated":
        data = data[: len(data) // 2]
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    message = str(info.value)
    assert str(path) in message
    assert "not a readable safetensors file" in message


@pytest.mark.parametrize("content", ["garbage", "bad-version", "empty"])
def test_corrupt_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    rng = np.random.default_rng(0)
    if content == "garbage":
        data = rng.bytes(4096)
    elif content == "bad-version":  # right magic, nonsense after it
        data = b"GGUF" + rng.bytes(4096)
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(path)
    message = str(info.value)
    assert str(path) in message
    assert "not a readable GGUF file" in message


def test_pytorch_bin_is_refused_and_never_unpickled(checkpoint, tmp_path):
    """A directory with only pickle weights is refused without loading the pickle.

    The pickle here creates a directory when unpickled, so any pickle.load / torch.load of it,
    even one that fails later, would leave a trace.
    """
    (checkpoint / "model.safetensors").unlink()
    sentinel = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))

    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Trap()}))
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    message = str(info.value)
    assert "pytorch_model.bin" in message
    assert "pickle" in message and "safetensors" in message
    assert not sentinel.exists(), "the pickle was loaded"


def test_directory_without_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(checkpoint)
    message = str(info.value)
    assert "model.safetensors" in message and "model.safetensors.index.json" in message


# ---------------------------------------------------------------------------------------------
# sharded checkpoints


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("sharded"), max_shard_size="20KB")


def test_sharded_checkpoint_loads_and_matches_torch(sharded, forward):
    directory, torch_model = sharded
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert not (directory / "model.safetensors").exists()

    model, _ = difflora_jax.load_model(directory)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 128, size=(2, 20)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :6] = 0  # left padding
    ours = forward(model, ids, mask)
    ref = torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= ATOL


def test_sharded_checkpoint_with_missing_shard(sharded, tmp_path):
    source, _ = sharded
    directory = tmp_path / "sharded"
    shutil.copytree(source, directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(directory)
    assert shard in str(info.value) and "missing" in str(info.value)


def test_sharded_checkpoint_with_corrupt_shard(sharded, tmp_path):
    source, _ = sharded
    directory = tmp_path / "sharded"
    shutil.copytree(source, directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (directory / shard).write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(CheckpointError) as info:
        difflora_jax.load_model(directory)
    assert shard in str(info.value)

"""Orbax adapter checkpoints: exact round trip, keep-last-N, atomicity (a temporary directory
of a killed save is never a checkpoint; a subprocess killed mid-save), adapters-only size,
base-model checks and clear errors for corrupt checkpoints; ``load_adapter``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.adapter_checkpoint import (
    Checkpointer,
    base_model_record,
    flatten,
    load_adapter,
    model_fingerprint,
)
from difflora_jax.catalog import model_shape
from difflora_jax.config import AdapterConfig, to_dict
from difflora_jax.errors import CheckpointError
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.training import make_optimizer, split_for_training
from difflora_jax.training.config import OptimizerConfig
from difflora_jax.weights.loading import load_model
from tests.tiny import BYTE_TINY, DIFFLORA, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _trained_like_state(model, seed=0):
    """Split ``model`` and give its adapters, optimizer state and RNG counts non-trivial values
    (numpy-drawn: no per-shape compilation)."""
    _, params, rng, _ = split_for_training(model)
    gen = np.random.default_rng(seed)

    def fill(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return x
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(np.full(x.shape, 7, x.dtype))
        return jnp.asarray(gen.standard_normal(x.shape).astype(x.dtype))

    params = jax.tree.map(fill, params)
    opt_state = jax.tree.map(fill, make_optimizer(OptimizerConfig(total_steps=10)).init(params))
    return params, opt_state, jax.tree.map(fill, rng)


def _meta(model, adapter=DIFFLORA, **extra):
    return {
        "adapter_config": to_dict(adapter),
        "base_model": base_model_record(model, "tiny-source"),
        "data_state": {"epoch": 0, "position": 12},
        **extra,
    }


def _assert_trees_equal(a, b):
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb)
    for name in fa:
        x, y = fa[name], fb[name]
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_round_trip_is_exact_and_only_the_last_n_are_kept(tmp_path):
    adapter = dataclasses.replace(DIFFLORA, dropout=0.1)
    model = tiny_model(adapter)
    params, opt_state, rng = _trained_like_state(model)
    with Checkpointer(tmp_path / "ckpt", keep=2) as checkpointer:
        for step in (2, 4, 6):
            meta = _meta(model, adapter)
            checkpointer.save(step, params=params, opt_state=opt_state, rng=rng, meta=meta)
        checkpointer.wait()
        assert checkpointer.steps() == [4, 6]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["4", "6"]

    _, template_params, template_rng, _ = split_for_training(model)
    template_opt = make_optimizer(OptimizerConfig(total_steps=10)).init(template_params)
    with Checkpointer(tmp_path / "ckpt", create=False) as checkpointer:
        restored = checkpointer.restore(
            params=template_params, opt_state=template_opt, rng=template_rng
        )
    assert restored.step == 6
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(restored.opt_state, opt_state)
    _assert_trees_equal(restored.rng, rng)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(opt_state)
    assert restored.meta["data_state"] == {"epoch": 0, "position": 12}
    assert restored.meta["adapter_config"]["dropout"] == 0.1
    assert restored.meta["base_model"]["fingerprint"] == model_fingerprint(model)
    assert restored.meta["base_model"]["config"]["num_layers"] == BYTE_TINY.num_layers


def test_unfinished_or_stray_directories_are_never_the_latest_checkpoint(tmp_path):
    model = tiny_model()
    params, opt_state, rng = _trained_like_state(model)
    directory = tmp_path / "ckpt"
    with Checkpointer(directory) as checkpointer:
        checkpointer.save(3, params=params, opt_state=opt_state, rng=rng, meta=_meta(model))
    # what a save killed before Orbax's final rename leaves, and a stray empty directory
    partial = directory / "9.orbax-checkpoint-tmp-1700000000"
    (partial / "adapters.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    (partial / "_CHECKPOINT_METADATA").write_text("{}")
    (directory / "12").mkdir()
    with Checkpointer(directory, create=False) as checkpointer:
        assert checkpointer.steps() == [3] and checkpointer.latest_step() == 3
        restored = checkpointer.restore(params=params)
        assert restored.step == 3


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_latest(tmp_path):
    directory = tmp_path / "ckpt"
    script = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np, jax.numpy as jnp
        from difflora_jax.adapter_checkpoint import Checkpointer
        meta = {{"adapter_config": {{}}, "base_model": {{}}}}
        ck = Checkpointer({str(directory)!r})
        small = {{"a": jnp.arange(4.0)}}
        ck.save(1, params=small, opt_state={{"m": jnp.zeros(4)}}, rng=None, meta=meta)
        ck.wait()
        big = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 4096), np.float32))
        ck.save(2, params={{"a": big}}, opt_state={{"m": big}}, rng=None, meta=meta)
        print(sorted(os.listdir({str(directory)!r})), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # while the asynchronous write is under way
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == -9, out.stderr[-2000:]
    left = sorted(os.listdir(directory))
    assert "1" in left and "2" not in left, left
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in left), left
    with Checkpointer(directory, create=False) as checkpointer:
        assert checkpointer.latest_step() == 1
        restored = checkpointer.restore(params={"a": jnp.zeros(4)})
    np.testing.assert_array_equal(restored.params["a"], np.arange(4.0))


def test_checkpoint_holds_adapters_only_far_below_the_base_model_size(tmp_path):
    # SmolLM2-135M's shape (abstract base: no weights needed) with DiffLoRA rank 8
    config = model_shape("smollm2-135m")
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    apply_adapters(model, dataclasses.replace(DIFFLORA, rank=8, alpha=16.0))
    params = nnx.to_pure_dict(nnx.state(model, AdapterParam))
    opt_state = make_optimizer(OptimizerConfig(total_steps=10)).init(params)
    meta = {"adapter_config": to_dict(DIFFLORA), "base_model": {"config": to_dict(config)}}
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        checkpointer.save(1, params=params, opt_state=opt_state, rng=None, meta=meta)
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file())
    adapter_bytes = sum(x.size * 4 for x in jax.tree.leaves(params))
    base_bytes = config.num_params * 2  # bfloat16
    # adapters + 2 moments (Orbax compresses: the zero B matrices and moments shrink to little)
    assert adapter_bytes / 4 < size < 3 * adapter_bytes + 1_000_000, (size, adapter_bytes)
    assert size < base_bytes / 50, (size, base_bytes)


def test_load_adapter_restores_onto_a_fresh_base_model_and_checks_it(tmp_path, tiny_hf_dir):
    model, _ = load_model(tiny_hf_dir, with_tokenizer=False)
    apply_adapters(model, DIFFLORA)
    params, opt_state, rng = _trained_like_state(model, seed=5)
    run_dir = tmp_path / "run"
    with Checkpointer(run_dir / "checkpoints") as checkpointer:
        checkpointer.save(7, params=params, opt_state=opt_state, rng=rng, meta=_meta(model))

    for where in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "7"):
        fresh, _ = load_model(tiny_hf_dir, with_tokenizer=False)
        assert load_adapter(fresh, where) is fresh
        assert fresh.adapter_config == DIFFLORA
        _assert_trees_equal(nnx.to_pure_dict(nnx.state(fresh, AdapterParam)), params)

    # the same weights in bfloat16 are the same base model (the fingerprint rounds to bf16)
    bf16, _ = load_model(tiny_hf_dir, dtype="bfloat16", with_tokenizer=False)
    load_adapter(bf16, run_dir)
    assert model_fingerprint(bf16) == model_fingerprint(model)

    # other weights, same configuration: the fingerprint differs
    other = tiny_model(None, seed=2)
    with pytest.raises(CheckpointError) as info:
        load_adapter(other, run_dir)
    message = str(info.value)
    assert "tiny-source" in message and "same configuration and different weights" in message
    assert model_fingerprint(model)[:12] in message and model_fingerprint(other)[:12] in message
    assert other.adapter_config is None  # nothing applied on failure

    # another configuration: both sides named, field by field
    bigger = tiny_model(
        None, config=dataclasses.replace(BYTE_TINY, num_layers=3, name="other-base")
    )
    with pytest.raises(CheckpointError, match=r"num_layers: 2 vs 3") as info:
        load_adapter(bigger, run_dir)
    assert "tiny-source" in str(info.value) and "other-base" in str(info.value)

    # a model already carrying other adapters
    lora = tiny_model(AdapterConfig(method="lora", rank=2, alpha=4.0), seed=1)
    with pytest.raises(CheckpointError, match="already carries different adapters"):
        load_adapter(lora, run_dir, check_base=False)


# A failed tensorstore read can leave a callback that fires after Orbax closed its event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_or_missing_checkpoints_give_clear_errors(tmp_path):
    model = tiny_model()
    params, opt_state, rng = _trained_like_state(model)
    directory = tmp_path / "ckpt"
    with Checkpointer(directory) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, params=params, opt_state=opt_state, rng=rng, meta=_meta(model))

    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(tiny_model(None), tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        load_adapter(tiny_model(None), empty)

    # garbage in the array data files of step 3
    data_files = [f for f in (directory / "3" / "adapters").rglob("*") if f.parent.name == "d"]
    assert data_files
    for f in data_files:
        f.write_bytes(b"\x00garbage" * 16)
    with Checkpointer(directory, create=False) as checkpointer:
        with pytest.raises(CheckpointError, match=r"checkpoint .*/3 is corrupt or incomplete"):
            checkpointer.restore(3, params=params)
    # the JSON record of step 2 is not JSON
    for f in (directory / "2" / "meta").rglob("*"):
        if f.is_file():
            f.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint .*/2 is corrupt or incomplete"):
        load_adapter(tiny_model(None), directory / "2")
    # arrays of another shape (another rank) are named before anything is read
    with Checkpointer(directory, create=False) as checkpointer:
        other = split_for_training(tiny_model(dataclasses.replace(DIFFLORA, rank=2)))[1]
        with pytest.raises(CheckpointError, match=r"has shape \(32, 4\) in the checkpoint"):
            checkpointer.restore(1, params=other)
        lora = split_for_training(tiny_model(AdapterConfig(method="lora", rank=4, alpha=8.0)))[1]
        with pytest.raises(CheckpointError, match=r"missing .* unexpected"):
            checkpointer.restore(1, params=lora)

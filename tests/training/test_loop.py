"""The training loop end to end on a tiny Llama read from a HF directory with a byte-level
ChatML tokenizer and the synthetic instruction mix: metrics (JSONL and TensorBoard), exact
resume, NaN stop with the last good checkpoint kept, run-directory protection."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from difflora_jax.adapter_checkpoint import (
    Checkpointer,
    flatten,
    load_adapter,
    read_checkpoint_meta,
)
from difflora_jax.config import to_dict
from difflora_jax.errors import AssetNotFoundError, CheckpointError, ConfigError
from difflora_jax.modeling.adapters import AdapterParam
from difflora_jax.training import NonFiniteLossError, read_metrics, to_per_layer, train
from difflora_jax.training.config import DataConfig, TrainConfig
from difflora_jax.weights.loading import load_model
from tests.tiny import DIFFLORA

METHOD = to_dict(dataclasses.replace(DIFFLORA, dropout=0.1))


def loop_config(model_dir, output_dir, **overrides) -> TrainConfig:
    """The shared tiny run (every test uses the same shapes and optimizer: one compilation)."""
    config = TrainConfig(
        model=str(model_dir),
        method=METHOD,
        output_dir=str(output_dir),
        dtype="float32",
        data=DataConfig(
            source="synthetic",
            num_examples=64,
            tasks=("copy", "count", "kv_lookup"),
            max_length=256,
        ),
        batch_size=4,
        grad_accum_steps=2,
        max_steps=6,
        learning_rate=1e-3,
        warmup_ratio=0.2,  # int(0.2 * 6) = 1 warmup step: update 1 has rate 0
        save_every=3,
        keep_checkpoints=2,
    )
    return dataclasses.replace(config, **overrides)


class Interrupt(Exception):
    pass


def _adapters(model) -> dict[str, np.ndarray]:
    return {
        k: np.asarray(v)
        for k, v in flatten(nnx.to_pure_dict(nnx.state(model, AdapterParam))).items()
    }


def _tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def uninterrupted(tiny_hf_dir, tmp_path_factory):
    config = loop_config(tiny_hf_dir, tmp_path_factory.mktemp("runs") / "full")
    return config, train(config, progress=False)


def test_run_writes_metrics_tensorboard_and_checkpoints(uninterrupted):
    config, result = uninterrupted
    run_dir = result.run_dir
    assert result.step == 6 and result.resumed_from is None
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records == result.metrics
    for r in records:
        assert set(r) >= {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "lambda"}
        assert np.isfinite(r["loss"]) and 0 < r["loss"] < 10 and r["tokens"] > 0
        assert r["tokens_per_s"] > 0 and set(r["lambda"]) == {"0", "1"}
    # the linear schedule: warmup update 1 at rate 0, then decay from the peak
    assert [r["lr"] for r in records] == pytest.approx([0.0, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    assert records[-1]["loss"] < records[0]["loss"]
    # lambda moves once the rate is non-zero, and the metric is the trained model's lambda
    assert records[0]["lambda"] != records[-1]["lambda"]
    final_lambda = [float(layer.attn.lambda_value()) for layer in result.model.layers]
    assert [records[-1]["lambda"][k] for k in ("0", "1")] == pytest.approx(final_lambda, rel=1e-6)

    scalars = _tensorboard_scalars(run_dir)
    assert scalars["loss"] == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)
    assert set(scalars) >= {"lr", "grad_norm", "tokens_per_s", "lambda/0", "lambda/1"}

    with Checkpointer(run_dir / "checkpoints", create=False) as checkpointer:
        assert checkpointer.steps() == [3, 6]
    meta = read_checkpoint_meta(run_dir)
    assert meta["step"] == 6 and meta["metrics"]["loss"] == records[-1]["loss"]
    assert meta["data_state"]["batches"] == 6 and meta["adapter_config"] == METHOD
    assert meta["base_model"]["source"] == config.model
    assert meta["train_config"]["batch_size"] == 4
    saved = json.loads(json.dumps(meta["train_config"]))
    assert saved["method"] == METHOD  # the method is recorded inline

    # the adapters load onto a freshly loaded base model, equal to the trained ones
    fresh, _ = load_model(config.model, with_tokenizer=False)
    load_adapter(fresh, run_dir)
    trained = _adapters(result.model)
    loaded = _adapters(fresh)
    assert all(np.array_equal(trained[k], loaded[k]) for k in trained)


def test_resume_reproduces_the_uninterrupted_run_exactly(uninterrupted, tmp_path):
    config, full = uninterrupted
    resumed_config = dataclasses.replace(config, output_dir=str(tmp_path / "resumed"))

    def interrupt_at_4(state, record):
        if state.step == 4:  # after step 4 is logged; the last checkpoint is step 3
            raise Interrupt

    with pytest.raises(Interrupt):
        train(resumed_config, step_callback=interrupt_at_4, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4]

    result = train(resumed_config, resume=True, progress=False)
    assert result.resumed_from == 3 and result.step == 6
    expected = read_metrics(full.run_dir)
    got = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # step 4 of the interrupted run dropped
    # bit-identical: the same compiled step on the same restored state, data and dropout keys
    for want, have in zip(expected, got):
        for key in ("loss", "grad_norm", "tokens", "lr", "lambda"):
            assert have[key] == want[key], (want["step"], key)
    full_adapters, resumed_adapters = _adapters(full.model), _adapters(result.model)
    assert all(np.array_equal(full_adapters[k], resumed_adapters[k]) for k in full_adapters)

    # resuming a finished run does nothing; resuming with another learning rate is refused
    again = train(resumed_config, resume=True, progress=False)
    assert again.step == 6 and again.metrics == []
    with pytest.raises(ConfigError, match=r"differs .* \['learning_rate'\]"):
        train(dataclasses.replace(resumed_config, learning_rate=2e-3), resume=True)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(uninterrupted, tmp_path):
    config, _ = uninterrupted
    config = dataclasses.replace(config, output_dir=str(tmp_path / "nan"), save_every=2)
    seen = {}

    def poison_after_4(state, record):
        if state.step == 4:  # checkpoint 4 is saved; then an adapter goes NaN
            seen["params"] = jax.tree.map(np.asarray, to_per_layer(state.params))
            # the loop carries the stacked layout: layer 1's lambda_q1 is row 1 of the run's
            stack = state.params["layer_runs"][(0, 2)]["attn"]
            stack["lambda_q1"] = stack["lambda_q1"].at[1].set(jnp.nan)

    with pytest.raises(NonFiniteLossError) as info:
        train(config, step_callback=poison_after_4, progress=False)
    message = str(info.value)
    assert "non-finite loss at step 5" in message and "loss=nan" in message
    assert "last good checkpoint is step 4" in message
    assert [r["step"] for r in read_metrics(tmp_path / "nan")] == [1, 2, 3, 4]

    with Checkpointer(tmp_path / "nan" / "checkpoints", create=False) as checkpointer:
        assert checkpointer.latest_step() == 4
    fresh, _ = load_model(config.model, with_tokenizer=False)
    load_adapter(fresh, tmp_path / "nan")
    loaded = _adapters(fresh)
    want = flatten(seen["params"])
    assert all(np.isfinite(v).all() for v in loaded.values())
    assert all(np.array_equal(loaded[k], want[k]) for k in want)


def test_a_new_run_never_writes_into_a_non_empty_directory(tiny_hf_dir, tmp_path):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"is not empty .*--resume"):
        train(loop_config(tiny_hf_dir, run_dir), progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match=r"holds no config\.yaml, so it is not a run directory"):
        train(loop_config(tiny_hf_dir, run_dir), resume=True, progress=False)
    # a run that fails before training (here: no such model) leaves no directory behind
    with pytest.raises(AssetNotFoundError, match="does not exist"):
        train(loop_config(tmp_path / "no-model", tmp_path / "fresh"), progress=False)
    assert not (tmp_path / "fresh").exists()


def test_cli_train_from_yaml_with_overrides_equals_the_api_run(uninterrupted, tmp_path, capsys):
    from difflora_jax.cli import main
    from difflora_jax.config import save_yaml

    config, full = uninterrupted
    # the method by name plus dotted overrides, and data.max_length from the command line
    yaml_config = dataclasses.replace(
        config,
        method="difflora-32",
        data=dataclasses.replace(config.data, max_length=4096),
        output_dir="unused",
    )
    path = tmp_path / "train.yaml"
    save_yaml(yaml_config, path)
    run_dir = tmp_path / "cli-run"
    argv = ["train", "--config", str(path), "--no-progress", "method.rank=4", "method.alpha=8"]
    argv += ["data.max_length=256", f"output_dir={run_dir}"]
    assert main([*argv, "--resume"]) == 0  # nothing to resume in an absent directory: starts
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = read_metrics(full.run_dir)
    assert printed == {"run_dir": str(run_dir), "step": 6, "loss": expected[-1]["loss"]}
    got = read_metrics(run_dir)
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]

    assert main(argv) == 1  # a new run there would overwrite this one
    assert "is not empty" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # finished: nothing to do
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6


def _damage_optimizer_files(step_dir) -> dict[str, bytes]:
    """Overwrite the optimizer item's data files with 20 random bytes; returns what was written."""
    written = {}
    rng = np.random.default_rng(0)
    for path in sorted((step_dir / "optimizer" / "d").iterdir()):
        path.write_bytes(rng.bytes(20))
        written[path.name] = path.read_bytes()
    assert written
    return written


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(uninterrupted, tmp_path, capfd):
    config, full = uninterrupted
    run_dir = tmp_path / "damaged"
    shutil.copytree(full.run_dir, run_dir)
    # the finished run holds checkpoints 3 and 6; with 6 damaged, resuming restarts after 3
    damaged = _damage_optimizer_files(run_dir / "checkpoints" / "6")
    resumed = train(
        dataclasses.replace(config, output_dir=str(run_dir)), resume=True, progress=False
    )
    err = capfd.readouterr().err
    assert resumed.resumed_from == 3 and resumed.step == 6
    assert f"warning: checkpoint {run_dir / 'checkpoints' / '6'} is corrupt" in err
    assert "Event loop is closed" not in err and "Traceback" not in err
    # the damaged checkpoint is kept, byte for byte, out of Orbax's directory
    kept = run_dir / "corrupt_checkpoints" / "6" / "optimizer" / "d"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == damaged
    # steps 4-6 are recomputed exactly, and a new checkpoint 6 is written
    want = {r["step"]: r["loss"] for r in read_metrics(full.run_dir)}
    got = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert got == want
    with Checkpointer(run_dir / "checkpoints", create=False) as checkpointer:
        assert checkpointer.latest_step() == 6


def test_resume_with_every_checkpoint_corrupt_says_so_cleanly(uninterrupted, tmp_path, capfd):
    config, full = uninterrupted
    run_dir = tmp_path / "ruined"
    shutil.copytree(full.run_dir, run_dir)
    for step in (3, 6):
        _damage_optimizer_files(run_dir / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match=r"none of its checkpoints \[3, 6\] is readable"):
        train(dataclasses.replace(config, output_dir=str(run_dir)), resume=True, progress=False)
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err
    assert sorted(p.name for p in (run_dir / "corrupt_checkpoints").iterdir()) == ["3", "6"]

"""TrainConfig / DataConfig: YAML round trip, validation naming the field, KEY=VALUE overrides,
the ``difflora train`` argument errors; the batch sources the loop builds from a DataConfig."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from difflora_jax.cli import main
from difflora_jax.config import AdapterConfig, load_yaml, save_yaml
from difflora_jax.data import BATCH_KEYS, make_mix
from difflora_jax.errors import ConfigError
from difflora_jax.training import RandomBatches, build_batches
from difflora_jax.training.config import DataConfig, TrainConfig, load_train_config, parse_override
from tests.tiny import byte_tokenizer

BASE = {"model": "some/model", "method": "difflora-32", "output_dir": "runs/x"}


def _write(tmp_path, data, name="train.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_the_papers_setup_and_yaml_round_trips(tmp_path):
    config = load_train_config(_write(tmp_path, BASE))
    assert (config.learning_rate, config.warmup_ratio, config.weight_decay) == (1e-4, 0.03, 0.0)
    assert (config.batch_size, config.data.max_length, config.dtype) == (64, 4096, "bfloat16")
    assert config.adapter_config().rank == 32 and config.adapter_config().dropout == 0.1
    assert config.warmup_steps == 30 and config.optimizer_config().total_steps == 1000

    full = TrainConfig(
        model="m",
        method={"method": "lora", "rank": 8, "alpha": 16.0, "targets": ["q", "v"]},
        output_dir="out",
        data=DataConfig(source="jsonl", path="d.jsonl", max_length=512, tasks=None),
        batch_size=8,
        grad_accum_steps=4,
        max_steps=50,
        learning_rate=2e-4,
        seed=3,
    )
    save_yaml(full, tmp_path / "full.yaml")
    assert load_yaml(TrainConfig, tmp_path / "full.yaml") == full
    mix = TrainConfig(**BASE, data=DataConfig(tasks=("copy", "count")))
    save_yaml(mix, tmp_path / "mix.yaml")
    loaded = load_yaml(TrainConfig, tmp_path / "mix.yaml")
    assert loaded == mix and loaded.data.tasks == ("copy", "count")


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"dtype": "float16"},
            "'dtype' = 'float16' is invalid: allowed values ['float32', 'bfloat16']",
        ),
        ({"batch_size": 6, "grad_accum_steps": 4}, "multiple of grad_accum_steps (4)"),
        ({"max_steps": 0}, "'max_steps' = 0 is invalid"),
        ({"warmup_ratio": 1.5}, "'warmup_ratio' = 1.5 is invalid: must be in [0, 1)"),
        ({"learning_rate": "fast"}, "'learning_rate' = 'fast': expected a number"),
        ({"data": {"source": "parquet"}}, "'data.source' = 'parquet' is invalid"),
        ({"data": {"source": "jsonl"}}, "'data.path' = None is invalid: must be set for source"),
        ({"data": {"tasks": ["copy", "poetry"]}}, "'data.tasks' = 'poetry' is invalid"),
        ({"data": {"max_len": 3}}, "data: unknown field(s) ['max_len']"),
        ({"method": {"rank": 0}}, "method: config field 'rank' = 0 is invalid"),
        ({"method": 5}, "'method' = 5 is invalid"),
        ({"epochs": 1}, "unknown field(s) ['epochs']; allowed fields: ["),
    ],
)
def test_bad_values_name_the_field(tmp_path, changes, message):
    with pytest.raises(ConfigError) as info:
        load_train_config(_write(tmp_path, {**BASE, **changes}))
    assert message in str(info.value)


def test_overrides_parse_yaml_values_and_dotted_keys(tmp_path):
    assert parse_override("learning_rate=1e-4") == ("learning_rate", 1e-4)  # YAML 1.1 says str
    assert parse_override("data.max_length=256") == ("data.max_length", 256)
    assert parse_override("data.tasks=[copy, count]") == ("data.tasks", ["copy", "count"])
    assert parse_override("data.path=null") == ("data.path", None)
    assert parse_override("model=path/to/dir") == ("model", "path/to/dir")

    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "mine.yaml").write_text("method: lora\nrank: 4\nalpha: 8.0\n")
    path = _write(tmp_path, {**BASE, "method": "methods/mine.yaml"})
    config = load_train_config(
        path,
        ["data.max_length=256", "data.source=random", "max_steps=20", "method.rank=2", "seed=7"],
    )
    # the relative method path was found next to the config file, then inlined for the override
    assert config.adapter_config() == AdapterConfig(method="lora", rank=2, alpha=8.0)
    assert (config.data.max_length, config.data.source, config.max_steps, config.seed) == (
        256,
        "random",
        20,
        7,
    )
    named = load_train_config(path, ["method=difflora-64", "method.rank=16"])
    assert named.adapter_config().rank == 16 and named.adapter_config().positive_term is False

    for bad, message in [
        ("max_steps", "not of the form KEY=VALUE"),
        ("epochs=3", "unknown field 'epochs'; allowed fields"),
        ("batch_size.x=1", "'batch_size' is 64, not a mapping"),
        ("data.bogus=1", "data: unknown field(s) ['bogus']"),
        ("data.max_length=1", "'data.max_length' = 1 is invalid"),
        ("method.rnak=4", "unknown field(s) ['rnak']"),
    ]:
        with pytest.raises(ConfigError, match=None) as info:
            load_train_config(_write(tmp_path, {**BASE, "batch_size": 64}), [bad])
        assert message in str(info.value), (bad, str(info.value))


def test_cli_train_reports_bad_configs(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2 and "--config" in capsys.readouterr().err
    path = _write(tmp_path, BASE)
    assert main(["train", "--config", str(path), "max_stepz=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("difflora: error:") and "unknown field 'max_stepz'" in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "method=no-such-method"]) == 1
    assert "unknown method 'no-such-method'" in capsys.readouterr().err


def test_random_batches_follow_the_batch_contract_and_resume():
    batches = build_batches(
        DataConfig(source="random", max_length=32, seed=4), None, batch_size=3, vocab_size=50
    )
    assert isinstance(batches, RandomBatches)
    first = [next(batches) for _ in range(3)]
    state = json.loads(json.dumps(batches.state()))
    after = next(batches)
    for batch in first:
        assert set(batch) == set(BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == (3, 32) for v in batch.values())
        ids, seg = batch["input_ids"], batch["segment_ids"]
        assert ids.max() < 50 and set(np.unique(seg)) == {1, 2}
        same = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((3, 1), bool)], axis=1)
        # targets are the next token within a segment; no loss across a boundary
        np.testing.assert_array_equal(batch["targets"][same], ids[:, 1:][same[:, :-1]])
        assert not batch["loss_mask"][~same].any() and batch["loss_mask"].sum() > 0
        starts = np.argmax(seg == 2, axis=1)
        assert (batch["positions"][np.arange(3), starts] == 0).all()
    resumed = RandomBatches(50, batch_size=3, max_length=32, seed=4, state=state)
    again = next(resumed)
    assert all(np.array_equal(again[k], after[k]) for k in BATCH_KEYS)
    with pytest.raises(ConfigError, match="saved with seed=4"):
        RandomBatches(50, batch_size=3, max_length=32, seed=5, state=state)


def test_data_sources_from_config(tmp_path):
    tokenizer = byte_tokenizer()
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        build_batches(DataConfig(max_length=64), None, batch_size=2, vocab_size=264)
    # a JSONL file holding the synthetic items gives the synthetic source's batches
    items = make_mix(16, seed=0, tasks=["copy", "count"])
    jsonl = tmp_path / "mix.jsonl"
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in items))
    common = dict(max_length=256, num_examples=16, seed=0)
    synthetic = build_batches(
        DataConfig(source="synthetic", tasks=("copy", "count"), **common),
        tokenizer,
        batch_size=2,
        vocab_size=264,
    )
    from_file = build_batches(
        DataConfig(source="jsonl", path=str(jsonl), **common),
        tokenizer,
        batch_size=2,
        vocab_size=264,
    )
    for _ in range(3):
        a, b = next(synthetic), next(from_file)
        assert all(np.array_equal(a[k], b[k]) for k in BATCH_KEYS)
        assert a["loss_mask"].sum() > 0 and a["input_ids"].max() < 264
    assert synthetic.state() == from_file.state()


def test_numbers_read_the_same_in_yaml_and_on_the_command_line(tmp_path):
    """PyYAML reads ``1e-4`` as a string; both places accept it as the number a researcher means."""
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: m\nmethod: difflora-32\noutput_dir: out\nlearning_rate: 1e-4\n"
        "weight_decay: 5E-2\nadam_eps: .5e-8\n"
    )
    from_yaml = load_train_config(path)
    from_cli = load_train_config(
        None,
        [
            "model=m",
            "method=difflora-32",
            "output_dir=out",
            "learning_rate=1e-4",
            "weight_decay=5E-2",
            "adam_eps=.5e-8",
        ],
    )
    assert from_yaml == from_cli
    assert (from_yaml.learning_rate, from_yaml.weight_decay, from_yaml.adam_eps) == (
        1e-4,
        5e-2,
        5e-9,
    )
    path.write_text("model: m\nmethod: difflora-32\noutput_dir: out\nlearning_rate: fast\n")
    with pytest.raises(ConfigError, match="'learning_rate' = 'fast': expected a number"):
        load_train_config(path)


def test_dropout_generator_is_a_named_choice():
    config = load_train_config(None, ["model=m", "method=difflora-32", "output_dir=o"])
    assert config.dropout_prng == "hash"
    assert (
        load_train_config(
            None, ["model=m", "method=lora-r8", "output_dir=o", "dropout_prng=rbg"]
        ).dropout_prng
        == "rbg"
    )
    with pytest.raises(ConfigError, match=r"'dropout_prng' = 'philox' is invalid"):
        load_train_config(
            None, ["model=m", "method=lora-r8", "output_dir=o", "dropout_prng=philox"]
        )

"""Presets of `difflora reproduce`: the shipped ones load and hold the paper's setup, overrides
apply, bad presets fail with the field named; evaluation jobs are keyed by their parameters."""

from __future__ import annotations

import json

import pytest

from difflora_jax.catalog import PAPER_VARIANTS
from difflora_jax.errors import AssetNotFoundError, ConfigError
from difflora_jax.reproduce import load_preset, preset_names
from difflora_jax.reproduce.artifacts import ARTIFACTS, artifact_jobs, expand
from difflora_jax.reproduce.presets import model_architecture
from difflora_jax.reproduce.runner import job, write_local_task


def test_shipped_presets_load_with_every_paper_variant():
    assert {"cpu-small", "paper"} <= set(preset_names())
    for name in ("cpu-small", "paper"):
        preset = load_preset(name)
        assert set(preset.variants) == set(PAPER_VARIANTS) - {"reference-quickstart"}
        config = preset.train_config("difflora-32", "runs/x")
        assert config.method == "difflora-32" and config.output_dir == "runs/x"


def test_paper_preset_is_the_papers_training_setup():
    """Spec section 6: lr 1e-4, 3% warmup, no weight decay, batch 64 x 4096, bfloat16 base."""
    config = load_preset("paper").train_config("lora-r8", "x")
    assert (config.learning_rate, config.warmup_ratio, config.weight_decay) == (1e-4, 0.03, 0.0)
    assert (config.batch_size, config.data.max_length, config.dtype) == (64, 4096, "bfloat16")


def test_overrides_change_fields_and_bad_ones_are_named(tmp_path):
    preset = load_preset(
        "cpu-small", ["train.max_steps=7", "eval.nih_lengths=[256,512]", "variants=[lora-r8]"]
    )
    assert preset.train["max_steps"] == 7 and preset.eval.nih_lengths == (256, 512)
    assert preset.variants == ("lora-r8",)
    with pytest.raises(ConfigError, match="unknown field"):
        load_preset("cpu-small", ["steps=3"])
    with pytest.raises(ConfigError, match=r"eval\.nih_num"):
        load_preset("cpu-small", ["eval.nih_num=0"])
    with pytest.raises(ConfigError, match=r"eval\.nih_tasks"):
        load_preset("cpu-small", ["eval.nih_tasks=[nih-mk9]"])
    with pytest.raises(ConfigError, match="no-such-method"):
        load_preset("cpu-small", ["variants=[no-such-method]"])
    with pytest.raises(ConfigError, match=r"train\.method"):
        load_preset("cpu-small", ["train.method=lora-r8"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("no-such-preset")
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nvariants: [lora-r8]\ntrain: {model: m, batch_size: -1}\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_preset(bad)


def test_job_key_follows_its_parameters_and_artifacts_share_none_by_accident():
    assert job("icl", shots=(4, 16), num=3).key == job("icl", shots=[4, 16], num=3).key
    assert job("icl", shots=(4, 16), num=3).key != job("icl", shots=(4, 16), num=4).key
    preset = load_preset("cpu-small")
    keys = {a: {j.key for j in artifact_jobs(a, preset)} for a in expand("all")}
    assert keys["table2"] == set()
    for a in keys:
        for b in keys:
            assert a == b or not keys[a] & keys[b]
    assert artifact_jobs("table1", preset) == artifact_jobs("table3", preset)
    assert set(expand("all")) == set(ARTIFACTS) - {"table3"}


def test_architecture_of_an_absent_checkpoint_is_the_catalog_shape():
    shape = model_architecture("/nowhere/Llama-3.2-1B-Instruct")
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads) == (16, 2048, 8)
    with pytest.raises(AssetNotFoundError, match="unknown-model"):
        model_architecture("/nowhere/unknown-model")


def test_local_lm_eval_task_has_the_gold_answer_at_its_index(tmp_path):
    from difflora_jax.data import make_mix

    directory = write_local_task(tmp_path, 10)
    rows = [json.loads(line) for line in (directory / "difflora_mix_mc.jsonl").open()]
    mix = make_mix(10, seed=1, split="eval")
    assert len(rows) == 10
    for row, item in zip(rows, mix):
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert row["choices"][row["answer"]] == " " + item["answer"]
        assert item["messages"][0]["content"] in row["question"]

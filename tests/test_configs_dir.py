"""The training YAMLs under the repository's ``configs/train`` are valid TrainConfigs."""

from pathlib import Path

import pytest

from difflora_jax.training.config import load_train_config

TRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


def test_there_are_training_configs():
    assert len(TRAIN_CONFIGS) >= 2


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_training_config_loads_and_names_a_shipped_method(path):
    config = load_train_config(path)
    adapter = config.adapter_config()  # a named method, found in the package data
    assert adapter.rank > 0
    assert config.learning_rate == pytest.approx(
        1e-4
    )  # written `1e-4`, which YAML reads as a string

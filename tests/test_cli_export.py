"""``difflora export`` and ``difflora import``: round trips through the command line, and errors
(exit 2 for bad arguments, exit 1 with a message for bad input, nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difflora_jax.adapter_checkpoint import read_adapter_checkpoint
from difflora_jax.cli import main
from difflora_jax.config import AdapterConfig
from tests.weights.conftest import adapted_checkpoint

LORA = AdapterConfig(method="lora", rank=4, alpha=8.0, targets=("q", "k", "o", "up"), layers=(1,))
DIFFLORA = AdapterConfig(method="difflora", rank=4, alpha=8.0, lora_mlp=True, group_norm=True)


def _assert_same_adapters(first, second):
    a, b = read_adapter_checkpoint(first), read_adapter_checkpoint(second)
    assert set(a.params) == set(b.params)
    for name, value in a.params.items():
        np.testing.assert_array_equal(b.params[name], value, err_msg=name)
    return b


@pytest.mark.parametrize("format, adapter", [("peft", LORA), ("reference", DIFFLORA)])
def test_export_then_import_round_trips(tiny_llama, tmp_path, capsys, format, adapter):
    directory, _ = tiny_llama()
    _, checkpoint = adapted_checkpoint(directory, tmp_path / "ckpt", adapter)
    exported = tmp_path / "exported"
    argv = ["export", "--adapter", str(checkpoint), "--format", format, "--out", str(exported)]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"format": format, "out": str(exported)}
    files = {"peft": ["adapter_config.json", "adapter_model.safetensors"]}
    assert sorted(p.name for p in exported.iterdir()) == files.get(
        format, ["config.json", "model.safetensors"]
    )

    imported = tmp_path / "imported"
    argv = ["import", "--format", format, "--path", str(exported), "--out", str(imported)]
    assert main([*argv, "--model", str(directory)]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == str(imported)
    assert _assert_same_adapters(checkpoint, imported).adapter == adapter


def test_export_merged(tiny_llama, tmp_path, capsys):
    directory, _ = tiny_llama()
    _, checkpoint = adapted_checkpoint(directory, tmp_path / "ckpt", LORA)
    out = tmp_path / "merged"
    argv = ["export", "--adapter", str(checkpoint), "--format", "merged", "--out", str(out)]
    assert main([*argv, "--model", str(directory)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]


def test_existing_output_exits_1_and_is_untouched(tiny_llama, tmp_path, capsys):
    directory, _ = tiny_llama()
    _, checkpoint = adapted_checkpoint(directory, tmp_path / "ckpt", LORA)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["export", "--adapter", str(checkpoint), "--format", "peft", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("difflora: error:") and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_inexpressible_export_exits_1_with_nothing_written(tiny_llama, tmp_path, capsys):
    directory, _ = tiny_llama()
    _, checkpoint = adapted_checkpoint(directory, tmp_path / "ckpt", DIFFLORA)
    for format, message in (("peft", "--format reference"), ("merged", "negative term")):
        out = tmp_path / f"out-{format}"
        argv = ["export", "--adapter", str(checkpoint), "--format", format, "--out", str(out)]
        assert main(argv) == 1
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(f".out-{format}.tmp-*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "--adapter", "a", "--format", "gguf", "--out", "o"], "invalid choice"),
        (["export", "--format", "peft", "--out", "o"], "--adapter"),
        (["export", "--adapter", "a", "--format", "peft"], "--out"),
        (["import", "--format", "merged", "--path", "p", "--out", "o"], "invalid choice"),
        (["import", "--format", "peft", "--out", "o"], "--path"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_inputs_exit_1(tmp_path, capsys):
    argv = ["export", "--adapter", str(tmp_path / "none"), "--format", "peft", "--out"]
    assert main([*argv, str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    argv = ["import", "--format", "peft", "--path", str(tmp_path), "--out"]
    assert main([*argv, str(tmp_path / "o")]) == 1
    assert "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

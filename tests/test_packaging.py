"""A plain (non-editable) install works: build the wheel, install it into a fresh virtual
environment, and run the README's commands from a directory outside the repository.

The fresh environment borrows the dependencies (jax, flax, ...) of the one running the tests
through a ``.pth`` line, which Python adds to ``sys.path`` after the environment's own
site-packages; ``.pth`` files inside that borrowed directory are not processed, so the
development environment's editable install of difflora_jax is invisible there. What the fresh
environment imports as ``difflora_jax`` is therefore the wheel, with the package data it ships.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built (no dependencies) into a temporary directory."""
    dist = tmp_path_factory.mktemp("dist")
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        cwd=dist,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = dist.glob("difflora_jax-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """``(the fresh environment's bin directory, a working directory outside the repo)``."""
    tmp = tmp_path_factory.mktemp("wheel")
    env_dir = tmp / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp
    ).stdout.strip()
    (Path(site) / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
        cwd=tmp,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    outside = tmp / "elsewhere"
    outside.mkdir()
    return env_dir / "bin", outside


def test_the_wheel_carries_the_named_models_methods_presets_and_toy_model(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for method in sorted((ROOT / "difflora_jax" / "configs" / "methods").glob("*.yaml")):
        assert f"difflora_jax/configs/methods/{method.name}" in names
    for shape in sorted((ROOT / "difflora_jax" / "configs" / "models").glob("*.yaml")):
        assert f"difflora_jax/configs/models/{shape.name}" in names
    for preset in sorted((ROOT / "difflora_jax" / "configs" / "presets").glob("*.yaml")):
        assert f"difflora_jax/configs/presets/{preset.name}" in names
    for name in ("config.json", "model.safetensors"):  # the notebooks' toy base model
        assert f"difflora_jax/reproduce/toy_base/{name}" in names


def test_import_uses_the_wheel_and_never_torch(installed):
    bin_dir, outside = installed
    probe = (
        "import sys, json, difflora_jax; "
        "print(json.dumps({'file': difflora_jax.__file__, 'torch': 'torch' in sys.modules}))"
    )
    result = _run([str(bin_dir / "python"), "-c", probe], cwd=outside)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch"] is False
    assert str(bin_dir.parent) in report["file"]  # the wheel's copy, not the repository's
    assert str(ROOT) not in report["file"]


def test_params_by_method_name_from_outside_the_repo(installed):
    bin_dir, outside = installed
    result = _run(
        [
            str(bin_dir / "difflora"),
            "params",
            "--model",
            "llama-3.2-1b",
            "--method",
            "difflora-32-gn",
            "--json",
        ],
        cwd=outside,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (row,) = report["methods"]
    # the reference code's count for DiffLoRA-32 + group norm on Llama-3.2-1B (paper, Table 2)
    assert set(row["per_layer"]) == {426_304}
    assert row["total"] == 16 * 426_304


def test_named_methods_attach_and_train_from_outside_the_repo(installed):
    bin_dir, outside = installed
    probe = (
        "import jax.numpy as jnp\n"
        "from flax import nnx\n"
        "from difflora_jax import LlamaForCausalLM\n"
        "from difflora_jax.catalog import load_method, model_shape\n"
        "from difflora_jax.weights.loading import attach_adapter\n"
        "import dataclasses\n"
        "config = dataclasses.replace(model_shape('smollm2-135m'), num_layers=2)\n"
        "model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))\n"
        "attach_adapter(model, 'difflora-32')\n"
        "assert model.adapter_config == load_method('difflora-32')\n"
        "from difflora_jax.training.config import TrainConfig\n"
        "train = TrainConfig(model='m', method='difflora-32-gn', output_dir='o')\n"
        "assert train.adapter_config().group_norm\n"
        "print(model.adapter_config.rank)\n"
    )
    result = _run([str(bin_dir / "python"), "-c", probe], cwd=outside)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "32"

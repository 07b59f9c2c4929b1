"""Two local processes x 4 CPU devices run ``difflora train`` under ``jax.distributed`` (gloo
collectives on 127.0.0.1), save collectively, are killed mid-run, and one process with 8
devices resumes on another mesh: the losses of every step equal those of an uninterrupted
single-process run. Twice: random tokens (every process makes the whole batch), and chat data
in two streams (``data.streams=2``: each process reads and packs only its own rows' stream,
and the resumed single process continues both from the gathered positions)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import byte_tokenizer, tiny_model, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from difflora_jax.cli import main; sys.exit(main())"]
STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DATA = {
    "random": {"source": "random", "max_length": 32, "seed": 0},
    # byte-level tokens: the short tasks of the mix fit 256 positions
    "streams": {"source": "synthetic", "num_examples": 48, "tasks": ["copy", "count", "kv_lookup"],
                "max_length": 256, "seed": 0, "streams": 2},
}  # fmt: skip


def _config(tmp_path: Path, model_dir: Path, run_dir: Path, data: str) -> Path:
    config = {
        "model": str(model_dir),
        "method": {"method": "difflora", "rank": 4, "alpha": 8.0, "group_norm": True},
        "output_dir": str(run_dir),
        "dtype": "float32",
        "data": DATA[data],
        "batch_size": 8,
        "max_steps": STEPS,
        "save_every": 2,
        "keep_checkpoints": 2,
        "learning_rate": 1e-2,
        "mesh": {"data": 2, "fsdp": 4, "tensor": 1},
    }
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return env


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "train", "--config", str(config), "--no-progress", *extra],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.parametrize("data", list(DATA))
def test_two_processes_killed_after_a_save_resume_on_one(tmp_path, data):
    model_dir = tmp_path / "model"
    write_hf_checkpoint(model_dir, tiny_model(None), tokenizer=byte_tokenizer())
    reference = _config(tmp_path, model_dir, tmp_path / "reference", data)
    proc = _train(reference, "--local-devices", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = _losses(tmp_path / "reference")
    assert sorted(want) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "run"
    config = _config(tmp_path, model_dir, run_dir, data)
    address = f"127.0.0.1:{_free_port()}"

    def worker(i: int) -> subprocess.Popen:
        args = ["--local-devices", "4", "--coordinator-address", address]
        args += ["--num-processes", "2", "--process-id", str(i)]
        return subprocess.Popen(
            [*CLI, "train", "--config", str(config), "--no-progress", *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    workers = [worker(0), worker(1)]
    checkpoints = run_dir / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints / "2").is_dir() and time.time() < deadline:
        assert all(w.poll() is None for w in workers), [w.communicate()[1][-3000:] for w in workers]
        time.sleep(0.05)
    for w in workers:  # preempted: no clean shutdown
        w.send_signal(signal.SIGKILL)
        w.wait()
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and 2 <= saved[-1] < STEPS, saved  # killed mid-run, after the first save
    logged = _losses(run_dir)  # process 0 logged the steps it ran; process 1 logged nothing
    assert min(logged) == 1 and max(logged) >= saved[-1]

    # one process, 8 devices, another mesh: the checkpoint is restored resharded
    proc = _train(config, "--local-devices", "8", "--resume", "mesh.data=8", "mesh.fsdp=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step], saved)

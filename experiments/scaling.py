"""Write ``docs/scaling.md``: ``difflora plan`` over model shapes, device counts, meshes and
methods (compiled without weights on fake CPU devices), plus the measured CPU mesh runs of the
tests (losses of a tiny model on four 8-device meshes against one device).

    python experiments/scaling.py --write docs/scaling.md [--models llama-3.2-1b,...]

Each plan runs ``difflora plan --json`` in its own process (the device count of a JAX process
is fixed when it starts). Settings: sequences of 4096 tokens, one per device (global batch =
devices), bfloat16 base weights, remat ``dots_with_no_batch_dims_saveable``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from difflora_jax.cli import main; sys.exit(main())"]
SEQ_LEN = 4096
REMAT = "dots_with_no_batch_dims_saveable"


def meshes(devices: int) -> list[str]:
    """Pure FSDP, and FSDP x 8-way tensor parallelism."""
    return [f"fsdp={devices}", f"fsdp={devices // 8},tensor=8"]


def plan(model: str, method: str, mesh: str, devices: int) -> dict:
    command = [
        *CLI, "plan", "--model", model, "--method", method, "--mesh", mesh,
        "--devices", str(devices), "--batch", str(devices), "--seq-len", str(SEQ_LEN),
        "--dtype", "bfloat16", "--remat", REMAT, "--json",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


def mesh_runs() -> list[str]:
    """The tests' tiny-model mesh runs (tests/parallel/mesh_worker.py), measured now."""
    lines = []
    for method in ("lora", "difflora-32-gn"):
        proc = subprocess.run(
            [sys.executable, "-m", "tests.parallel.mesh_worker", method],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(proc.stdout.split("RESULT ", 1)[1])
        for mesh, r in result.items():
            losses = ", ".join(f"{x:.6f}" for x in r["losses"])
            lines.append(
                f"| {method} | {mesh} | {losses} | {r['loss_diff']:.1e} | {r['grad_diff']:.1e} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", default="docs/scaling.md")
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b,llama-2-70b")
    parser.add_argument("--devices", default="8,64,256")
    parser.add_argument("--methods", default="lora-r8,difflora-32-gn")
    args = parser.parse_args()
    start = time.time()
    rows = []
    for model in args.models.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            for mesh in meshes(devices):
                for method in args.methods.split(","):
                    r = plan(model, method, mesh, devices)
                    print(model, devices, mesh, method, r.get("total_bytes_per_device"), flush=True)
                    if "error" in r:
                        rows.append(
                            f"| {model} | {devices} | {mesh} | {method} | {r['error']} |||||||"
                        )
                        continue
                    rows.append(
                        f"| {model} | {devices} | {mesh} | {method} | "
                        f"{gib(r['param_bytes_per_device'])} | {gib(r['adapter_bytes_per_device'])} | "
                        f"{gib(r['optimizer_bytes_per_device'])} | {gib(r['temp_bytes_per_device'])} | "
                        f"{gib(r['total_bytes_per_device'])} | {r['flops_per_step']:.2e} | "
                        f"{r['compile_s']} |"
                    )
    runs = mesh_runs()
    took = time.time() - start
    text = [
        "# Scaling: per-device memory plans and CPU mesh runs",
        "",
        f"Written by `python experiments/scaling.py --write {args.write}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({platform.processor() or platform.machine()}, "
        f"2-core CPU; the run took {took / 60:.0f} min). Regenerate, do not edit.",
        "",
        "## Plans (`difflora plan`)",
        "",
        f"Each row compiles the sharded train step without weights on fake CPU devices: "
        f"{SEQ_LEN}-token sequences, one per device (global batch = devices), bfloat16 base "
        f"weights, float32 adapters and AdamW state, remat `{REMAT}`. GiB per device. Base "
        "weights, adapters and optimizer state are exact (the shard shapes); temporaries are "
        "XLA:CPU's schedule of the same program (an accelerator's compiler schedules "
        "differently: read them as an estimate). Model FLOPs by `difflora_jax/modeling/flops.py`.",
        "",
        "| model | devices | mesh | method | base weights | adapters | optimizer | temporaries "
        "| total | model FLOPs/step | compile s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "## Measured CPU mesh runs",
        "",
        "`tests/parallel/mesh_worker.py`: a tiny Llama (3 layers, 8 heads, 4 KV heads), 3 train "
        "steps of batch 8 x 32 on 8 CPU devices per mesh (data x fsdp x tensor) against one "
        "device (1x1x1): losses, and the largest difference of any loss and of any adapter "
        "gradient entry from the one-device run. The `-accum2` rows accumulate two "
        "micro-batches and are compared with one device accumulating them (`1x1x1-accum2`).",
        "",
        "| method | mesh | losses (steps 1-3) | max loss diff | max gradient diff |",
        "|---|---|---|---:|---:|",
        *runs,
        "",
    ]
    Path(args.write).write_text("\n".join(text))
    print(f"wrote {args.write}")


if __name__ == "__main__":
    main()

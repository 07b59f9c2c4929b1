"""Running evaluations over a model: batched greedy generation, scores, summaries, and the
files ``difflora eval`` writes (``results.json`` with every item, ``table.md``).

Tasks: ``nih-single``, ``nih-mk2``, ``nih-mk3``, ``nih-mv`` (generated, over ``lengths``; or a
RULER-style JSONL via ``data``), ``icl`` (over ``shots``), ``rag`` (over ``distractors``),
``attention-mass`` (over ``lengths``), ``perplexity`` (held-out text) and ``humaneval`` (the packaged problems, executed in the
sandbox of ``evaluation.humaneval``). Every task also reports generation health (distinct-n,
longest repeated n-gram) of its outputs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from difflora_jax.errors import ConfigError
from difflora_jax.evaluation.attention_mass import SEGMENTS, attention_mass
from difflora_jax.evaluation.humaneval import SandboxLimits, check_completion, load_problems
from difflora_jax.evaluation.icl import icl_score, load_icl_data, make_icl, make_icl_from_rows
from difflora_jax.evaluation.metrics import contains_all, generation_health
from difflora_jax.evaluation.nih import TASKS as NIH_TASKS
from difflora_jax.evaluation.nih import NIHItem, load_nih_data, make_nih_set
from difflora_jax.evaluation.perplexity import evaluate_perplexity, load_documents
from difflora_jax.evaluation.rag import load_rag_data, make_rag
from difflora_jax.generation import generate
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.protocols import Tokenizer

EVAL_TASKS = (*NIH_TASKS, "icl", "rag", "humaneval", "attention-mass", "perplexity")


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def evaluate_nih(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    items: Sequence[NIHItem],
    *,
    batch_size: int = 4,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers to ``items`` (chat template; a RULER row without a separate question is
    sent as plain text), each scored by the fraction of its gold values found in the output.
    Items are batched in order of length."""
    items = sorted(items, key=lambda item: item.length)
    chat = bool(items and items[0].question)
    return _generate_scored(
        model,
        tokenizer,
        items[0].task if items else "nih",
        items,
        sweep="length",
        prompt=(lambda item: item.messages()) if chat else (lambda item: item.context),
        chat=chat,
        score=lambda out, item: contains_all(out, item.answers),
        extra=lambda item: {
            "answers": list(item.answers),
            "depths": [round(n.depth, 3) for n in item.needles],
        },
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )


# Where a HumanEval completion ends: the next top-level statement (the standard stop set).
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def evaluate_humaneval(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    *,
    num: int = 164,
    batch_size: int = 4,
    max_new_tokens: int = 384,
    limits: SandboxLimits | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """pass@1 with greedy completions of the first ``num`` problems (the prompt as text, no
    chat template, cut at the standard stop sequences), each run by the sandbox."""
    problems = load_problems()[:num]
    limits = limits or SandboxLimits()
    records = []
    bar = tqdm(total=len(problems), desc="humaneval", disable=not progress, dynamic_ncols=True)
    for chunk in _batches(problems, batch_size):
        outputs = generate(
            model,
            tokenizer,
            [p["prompt"] for p in chunk],
            max_new_tokens=max_new_tokens,
            stop=HUMANEVAL_STOPS,
        )
        for problem, out in zip(chunk, outputs):
            result = check_completion(problem, out.text, limits)
            records.append(
                {
                    "task": "humaneval",
                    "length": 0,
                    "task_id": problem["task_id"],
                    "output": out.text,
                    "score": float(result.passed),
                    "status": result.status,
                    "detail": result.detail,
                }
            )
        bar.update(len(chunk))
    bar.close()
    return records


def summarize_attention(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length and map (positive, negative): the per-token attention mass of each segment,
    averaged over items (the attention-mass task's records)."""
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["task"] == "attention-mass":
            groups[r["length"]].append(r)
    rows = []
    for length, group in sorted(groups.items()):
        for term in ("positive", "negative"):
            found = [r[term]["per_token"] for r in group if term in r]
            if found:
                rows.append(
                    {
                        "length": length,
                        "map": term,
                        "n": len(found),
                        **{s: float(sum(f[s] for f in found) / len(found)) for s in SEGMENTS},
                    }
                )
    return rows


def attention_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "Attention per token of each segment (query rows, heads and layers averaged):",
        "",
        "| length | map | n | " + " | ".join(SEGMENTS) + " |",
        "|---:|---|---:|" + "---:|" * len(SEGMENTS),
    ]
    for r in rows:
        cells = " | ".join(f"{r[s]:.2e}" for s in SEGMENTS)
        lines.append(f"| {r['length']} | {r['map']} | {r['n']} | {cells} |")
    return "\n".join(lines) + "\n"


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score (and generation health) per (task, length) of the generation tasks."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["task"] == "attention-mass":
            continue
        groups[(r["task"], r.get("length", 0))].append(r)
    rows = []
    for (task, length), group in sorted(groups.items()):
        if task == "perplexity":  # token-weighted: exp(total NLL / total tokens)
            tokens = sum(r["tokens"] for r in group)
            score = math.exp(sum(r["nll"] for r in group) / max(tokens, 1))
            rows.append({"task": task, "length": length, "n": len(group), "score": score})
            continue
        rows.append(
            {
                "task": task,
                "length": length,
                "n": len(group),
                "score": sum(r["score"] for r in group) / len(group),
                **generation_health(r["output"] for r in group),
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], header: str = "") -> str:
    lines = [header, ""] if header else []
    lines += [
        "| task | length / shots / distractors | n | score | distinct-2 | longest repeat "
        "(mean / max) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['length'] or '-'} | {r['n']} | {r['score']:.3f} | "
            f"{r.get('distinct_2', float('nan')):.3f} | {r.get('longest_repeat_mean', 0):.1f} / "
            f"{r.get('longest_repeat_max', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def _generate_scored(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    task: str,
    items: Sequence[Any],
    *,
    sweep: str,
    chat: bool,
    score: Callable[[str, Any], float],
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    prompt: Callable[[Any], Any] | None = None,
    extra: Callable[[Any], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Greedy outputs of ``items`` scored by ``score(output, item)``. The prompt of an item is
    ``prompt(item)``, by default its ``messages()`` (``chat``) or its ``prompt``; ``length``
    records the sweep value ``getattr(item, sweep)``; ``extra(item)`` adds fields."""
    if prompt is None:
        prompt = (lambda item: item.messages()) if chat else (lambda item: item.prompt)
    records = []
    bar = tqdm(total=len(items), desc=task, disable=not progress, dynamic_ncols=True)
    for chunk in _batches(items, batch_size):
        prompts = [prompt(item) for item in chunk]
        outputs = generate(model, tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens)
        for item, out in zip(chunk, outputs):
            records.append(
                {
                    "task": task,
                    "length": getattr(item, sweep),
                    "seed": item.seed,
                    "output": out.text,
                    "score": score(out.text, item),
                    **(extra(item) if extra else {}),
                }
            )
        bar.update(len(chunk))
    bar.close()
    return records


def run_task(
    task: str,
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    *,
    lengths: Sequence[int] = (1024,),
    shots: Sequence[int] = (4, 16, 64),
    distractors: Sequence[int] = (4, 9, 19),
    num: int = 20,
    seed: int = 0,
    data: str | None = None,
    batch_size: int = 4,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The per-item records of one task (see the module docstring)."""
    if task not in EVAL_TASKS:
        raise ConfigError(f"unknown evaluation task {task!r}; known: {list(EVAL_TASKS)}")
    if task == "icl":
        items = [make_icl(n, seed + i) for n in shots for i in range(num)]
        if data:
            rows = load_icl_data(data)
            items = [
                make_icl_from_rows(rows[:i] + rows[i + 1 :], rows[i], n, seed + i)
                for n in shots
                for i in range(min(num, len(rows)))
            ]
        return _generate_scored(
            model, tokenizer, task, items, sweep="shots", chat=False,
            score=lambda out, item: icl_score(out, item.answer), batch_size=batch_size,
            max_new_tokens=max_new_tokens or 4, progress=progress,
        )  # fmt: skip
    if task == "rag":
        items = load_rag_data(data) if data else [
            make_rag(k, seed + i) for k in distractors for i in range(num)
        ]  # fmt: skip
        return _generate_scored(
            model, tokenizer, task, items, sweep="distractors", chat=True,
            score=lambda out, item: contains_all(out, item.answers), batch_size=batch_size,
            max_new_tokens=max_new_tokens or 16, progress=progress,
        )  # fmt: skip
    if task == "perplexity":
        return evaluate_perplexity(model, tokenizer, load_documents(data, num, seed))
    if task == "attention-mass":
        return [
            {
                "task": task,
                "length": item.length,
                "seed": item.seed,
                **attention_mass(model, tokenizer, item),
            }
            for item in make_nih_set("nih-single", lengths, tokenizer, num, seed)
        ]
    if task == "humaneval":
        return evaluate_humaneval(
            model, tokenizer, num=num, batch_size=batch_size, max_new_tokens=max_new_tokens or 384,
            progress=progress,
        )  # fmt: skip
    limit = model.config.max_position_embeddings
    too_long = [n for n in lengths if n + (max_new_tokens or 32) > limit]
    if too_long:
        raise ConfigError(
            f"lengths {too_long} plus the answer exceed the model's {limit} positions"
        )
    items = load_nih_data(data, task) if data else make_nih_set(task, lengths, tokenizer, num, seed)
    return evaluate_nih(
        model, tokenizer, items, batch_size=batch_size, max_new_tokens=max_new_tokens or 32,
        progress=progress,
    )  # fmt: skip


def write_results(out: Path, meta: dict[str, Any], records: list[dict], rows: list[dict]) -> None:
    """``results.json`` (meta, summary rows, every record) and ``table.md`` in ``out``, written
    to a temporary directory renamed at the end (a failure leaves nothing); an existing
    non-empty ``out`` is refused."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose another directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=False)
    (tmp / "results.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "records": records}, indent=1)
    )
    header = f"`{meta['command']}` ({meta['date']})"
    attention = summarize_attention(records)
    table = markdown_table(rows, header) if rows else header + "\n"
    if attention:
        table += "\n" + attention_table(attention)
    (tmp / "table.md").write_text(table)
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

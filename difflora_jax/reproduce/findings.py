"""The paper's qualitative findings (``paper.FINDINGS``) checked against a reproduction's scores:
for each, the numbers that decide it and whether it holds at this scale. Every statement is
computed from the scores on disk; nothing here is typed in."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from difflora_jax.evaluation.attention_mass import SEGMENTS
from difflora_jax.reproduce.artifacts import artifact_jobs
from difflora_jax.reproduce.presets import Preset
from difflora_jax.reproduce.runner import BASE, Job

PAPER_DIFFLORA = ("difflora-64", "difflora-64-fixed-lambda", "difflora-32")


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _scores(result: dict[str, Any] | None) -> dict[int, float]:
    return {r["length"]: r["score"] for r in (result or {}).get("summary", [])}


class Scores:
    """Named metrics of each model, read from the cached job results."""

    def __init__(self, preset: Preset, results: dict[str, dict[str, Any]]):
        self.preset, self.results = preset, results
        self.jobs: dict[str, Job] = {}
        for artifact in ("fig1", "fig2", "fig3", "table1", "fig4"):
            for j in artifact_jobs(artifact, preset):
                self.jobs[j.name + ("-init" if j.init else "")] = j

    def result(self, model: str, name: str) -> dict[str, Any] | None:
        item = self.jobs.get(name)
        return None if item is None else self.results.get(model, {}).get(item.slot)

    def metrics(self, model: str) -> dict[str, float]:
        """Every higher-is-better task score of ``model`` (means over each sweep)."""
        out: dict[str, float] = {}
        heldout = self.result(model, "heldout") or {}
        out["mix accuracy"] = heldout.get("accuracy", {}).get("all", math.nan)
        tasks = (self.result(model, "lm-eval") or {}).get("tasks", {})
        for task, values in sorted(tasks.items()):
            out[f"{task} acc"] = values.get("acc,none", math.nan)
        for name in ("humaneval", "icl", *self.preset.eval.nih_tasks, "rag"):
            out[name] = _mean(list(_scores(self.result(model, name)).values()))
        return out

    def health(self, model: str) -> tuple[float, float]:
        """(mean distinct-2, mean longest repeated n-gram) over the generation tasks."""
        rows = [
            r
            for name in ("humaneval", "icl", *self.preset.eval.nih_tasks, "rag")
            for r in (self.result(model, name) or {}).get("summary", [])
        ]
        return (
            _mean([r.get("distinct_2", math.nan) for r in rows]),
            _mean([r.get("longest_repeat_mean", math.nan) for r in rows]),
        )


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _verdict(ok: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "not measurable"}[ok]


def check_findings(preset: Preset, results: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """``[{"finding", "here", "verdict"}]``, one per paper finding (and the identity start)."""
    s = Scores(preset, results)
    models = [BASE, *preset.variants]
    metrics = {m: s.metrics(m) for m in models}
    diff = [v for v in PAPER_DIFFLORA if v in preset.variants]
    rows: list[dict[str, str]] = []

    def add(finding: str, here: str, ok: bool | None) -> None:
        rows.append({"finding": finding, "here": here, "verdict": _verdict(ok)})

    def compare(a: str, b: str) -> tuple[int, int, int]:
        """(metrics where a > b, where a == b, metrics compared)."""
        pairs = [
            (metrics[a][k], metrics[b][k])
            for k in metrics[a]
            if not (math.isnan(metrics[a][k]) or math.isnan(metrics[b][k]))
        ]
        return sum(x > y for x, y in pairs), sum(x == y for x, y in pairs), len(pairs)

    if "lora-r8" in metrics and diff:
        wins = [compare("lora-r8", v) for v in diff]
        won, tied, total = (sum(w[i] for w in wins) for i in range(3))
        add(
            "LoRA beats DiffLoRA on most tasks",
            f"LoRA ahead in {won}, level in {tied}, behind in {total - won - tied} of {total} "
            "(metric, DiffLoRA variant) pairs",
            won > total - won - tied if total else None,
        )
        _versus(add, metrics, diff, "humaneval", "DiffLoRA is ahead of LoRA on HumanEval")
        mv = "nih-mv" if "nih-mv" in preset.eval.nih_tasks else None
        if mv:
            _versus(add, metrics, diff, mv, "DiffLoRA is ahead on multi-value needle retrieval")
    shots = preset.eval.icl_shots
    if len(shots) > 1:
        falls = []
        for m in models:
            by_shots = _scores(s.result(m, "icl"))
            if shots[0] in by_shots and shots[-1] in by_shots:
                falls.append((m, by_shots[shots[0]], by_shots[shots[-1]]))
        down = [m for m, first, last in falls if last < first]
        add(
            "many-shot ICL degrades with more demonstrations",
            f"accuracy lower at {shots[-1]} than at {shots[0]} shots for {len(down)} of "
            f"{len(falls)} models" + (f" ({', '.join(down)})" if down else ""),
            (len(down) > len(falls) / 2) if falls else None,
        )
    if "difflora-32-gn" in metrics:
        gn, base = metrics["difflora-32-gn"], metrics[BASE]
        keys = [k for k in gn if not (math.isnan(gn[k]) or math.isnan(base[k]))]
        gn_mean, base_mean = _mean([gn[k] for k in keys]), _mean([base[k] for k in keys])
        add(
            "DiffLoRA-32 + GN destroys the pretrained model (near-zero scores)",
            f"mean task score {_fmt(gn_mean)} against the base model's {_fmt(base_mean)}",
            gn_mean < 0.25 * base_mean if keys and base_mean > 0 else None,
        )
    if diff:
        health = {m: s.health(m) for m in models}
        worst = max(diff, key=lambda v: health[v][1])
        ref = [m for m in (BASE, "lora-r8") if m in health]
        add(
            "DiffLoRA sometimes generates degenerate text",
            f"longest repeated n-gram (mean) {_fmt(health[worst][1])} for {worst} against "
            + ", ".join(f"{_fmt(health[m][1])} for {m}" for m in ref)
            + f"; distinct-2 {_fmt(health[worst][0])} against "
            + ", ".join(_fmt(health[m][0]) for m in ref),
            health[worst][1] > max(health[m][1] for m in ref) if ref else None,
        )
        _attention(add, s, diff)
    _identity(add, s, preset)
    return rows


def _versus(add: Callable, metrics: dict, diff: list[str], key: str, finding: str) -> None:
    best = max(diff, key=lambda v: -math.inf if math.isnan(metrics[v][key]) else metrics[v][key])
    lora, top = metrics["lora-r8"][key], metrics[best][key]
    tie = " (level)" if top == lora else ""
    add(
        finding,
        f"{key}: best DiffLoRA ({best}) {_fmt(top)} against LoRA {_fmt(lora)}{tie}",
        None if math.isnan(lora) or math.isnan(top) else top > lora,
    )


def _attention(add: Callable, s: Scores, diff: list[str]) -> None:
    """BOS share and needle-to-context contrast of the effective map (positive minus the
    lambda-scaled negative) against the base model's."""

    def effective(model: str) -> dict[str, float] | None:
        rows = (s.result(model, "attention-mass") or {}).get("attention", [])
        pos = [r for r in rows if r["map"] == "positive"]
        neg = [r for r in rows if r["map"] == "negative"]
        if not pos:
            return None
        return {
            seg: _mean([r[seg] for r in pos]) - (_mean([r[seg] for r in neg]) if neg else 0.0)
            for seg in SEGMENTS
        }

    base = effective(BASE)
    found = {v: effective(v) for v in diff}
    found = {v: e for v, e in found.items() if e is not None}
    if base is None or not found:
        add("attention mass on BOS drops and the context around the needle is denoised", "", None)
        return

    def contrast(e: dict[str, float]) -> float:
        context = (e["before"] + e["after"]) / 2
        return e["needle"] / context if context > 0 else math.inf

    bos_down = [v for v, e in found.items() if e["bos"] < base["bos"]]
    sharper = [v for v, e in found.items() if contrast(e) > contrast(base)]
    add(
        "attention mass on BOS drops slightly and the context around the needle is denoised",
        f"effective BOS mass per token below the base model's ({_fmt(base['bos'])}) for "
        f"{len(bos_down)} of {len(found)} DiffLoRA variants; needle-to-context contrast above "
        f"the base model's ({_fmt(contrast(base))}) for {len(sharper)} of {len(found)}",
        len(bos_down) > len(found) / 2 and len(sharper) > len(found) / 2,
    )


def _identity(add: Callable, s: Scores, preset: Preset) -> None:
    if "difflora-identity" not in preset.variants:
        return
    base = (s.result(BASE, "heldout") or {}).get("loss", math.nan)
    init = {
        v: (s.result(v, "heldout-init") or {}).get("loss", math.nan)
        for v in ("difflora-identity", *PAPER_DIFFLORA)
        if v in preset.variants
    }
    final = {
        v: (s.result(v, "heldout") or {}).get("loss", math.nan)
        for v in ("difflora-identity", "lora-r8", *PAPER_DIFFLORA)
        if v in preset.variants
    }
    paper_final = [final[v] for v in PAPER_DIFFLORA if v in final]
    add(
        "(ours) the identity start keeps the base model at step 0 and ends no worse",
        f"held-out loss at step 0: identity {_fmt(init['difflora-identity'])}, base "
        f"{_fmt(base)}, paper DiffLoRA inits "
        + ", ".join(_fmt(init[v]) for v in PAPER_DIFFLORA if v in init)
        + f"; after training: identity {_fmt(final['difflora-identity'])}, paper DiffLoRA "
        + ", ".join(_fmt(x) for x in paper_final),
        None
        if math.isnan(base)
        else abs(init["difflora-identity"] - base) < 1e-2 * abs(base)
        and all(final["difflora-identity"] <= x for x in paper_final),
    )


def findings_table(rows: list[dict[str, str]]) -> str:
    lines = ["| paper finding | here | verdict |", "|---|---|---|"]
    lines += [f"| {r['finding']} | {r['here']} | {r['verdict']} |" for r in rows]
    return "\n".join(lines) + "\n"

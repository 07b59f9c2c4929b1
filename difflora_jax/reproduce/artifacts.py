"""The paper's artifacts: which evaluation jobs each needs, and its markdown table and plot.

table2   hyperparameters and trainable-parameter counts of every variant
fig1     general abilities: HumanEval pass@1, the held-out instruction mix (loss before and
         after training, answer accuracy), lm-evaluation-harness tasks
fig2     many-shot in-context learning: accuracy against the number of demonstrations
fig3     needle-in-a-haystack (multi-key 2 and 3, multi-value) against context length
table1   RAG QA: one gold document among distractors sharing its entities (``table3`` is
         the same table: the paper's RAG results with the Tulu-3 row)
fig4     attention mass per prompt segment, positive and lambda-scaled negative maps
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no backend switched, no global figure state

from difflora_jax.catalog import load_method, model_shape
from difflora_jax.evaluation.attention_mass import SEGMENTS
from difflora_jax.modeling.adapters import trainable_params_per_layer
from difflora_jax.reproduce import paper
from difflora_jax.reproduce.presets import EvalPlan, Preset, model_architecture
from difflora_jax.reproduce.runner import BASE, Job, Reproduction, job

ARTIFACTS = ("table2", "fig1", "fig2", "fig3", "table1", "table3", "fig4")
ALL = "all"


def artifact_jobs(artifact: str, preset: Preset) -> list[Job]:
    plan: EvalPlan = preset.eval
    if artifact == "table2":
        return []
    if artifact == "fig1":
        heldout: dict[str, Any] = {
            "items": plan.heldout_items,
            "max_length": preset.train["data"]["max_length"],
        }
        jobs = [
            job("heldout", **heldout),
            job("heldout", init=True, **heldout),
            job("humaneval", num=plan.humaneval_num, max_new_tokens=plan.humaneval_max_new_tokens),
        ]
        if plan.lm_eval_tasks or plan.lm_eval_local:
            jobs.append(
                job("lm-eval", tasks=plan.lm_eval_tasks, include=plan.lm_eval_include,
                    local=plan.lm_eval_local, items=plan.heldout_items, limit=plan.lm_eval_limit)
            )  # fmt: skip
        return jobs
    if artifact == "fig2":
        return [job("icl", shots=plan.icl_shots, num=plan.icl_num, data=plan.icl_data)]
    if artifact == "fig3":
        return [
            job(task, lengths=plan.nih_lengths, num=plan.nih_num, data=plan.nih_data)
            for task in plan.nih_tasks
        ]
    if artifact in ("table1", "table3"):
        return [job("rag", distractors=plan.rag_distractors, num=plan.rag_num, data=plan.rag_data)]
    if artifact == "fig4":
        return [job("attention-mass", lengths=plan.attention_lengths, num=plan.attention_num)]
    raise ValueError(artifact)


def _models(repro: Reproduction) -> list[str]:
    return [BASE, *repro.preset.variants]


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _summary(result: dict[str, Any] | None) -> dict[Any, dict[str, Any]]:
    """A generation job's summary rows by sweep value (length, shots or distractors)."""
    return {row["length"]: row for row in (result or {}).get("summary", [])}


def _subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


# -- table2 ---------------------------------------------------------------------------------
def render_table2(repro: Reproduction, _: dict, out: Path) -> tuple[str, list[str]]:
    preset = repro.preset
    config = model_architecture(preset.train["model"])
    paper_shape = model_shape("llama-3.2-1b")
    rows = []
    for variant in preset.variants:
        m = load_method(variant)
        ours = sum(trainable_params_per_layer(config, m).values())
        on_1b = sum(trainable_params_per_layer(paper_shape, m).values())
        lam = f"{m.lambda_mode}" + (f" {m.lambda_init}" if m.lambda_init is not None else "")
        rows.append([
            variant, m.method, m.rank, m.alpha, m.dropout,
            "yes" if m.positive_term else "no", m.negative_term if m.method == "difflora" else "-",
            lam if m.method == "difflora" else "-", "yes" if m.group_norm else "no",
            "yes" if m.identity_start else "no", f"{ours:,}", f"{on_1b:,}",
            f"{paper.PARAMS_LLAMA_3_2_1B[variant]:,}" if variant in paper.PARAMS_LLAMA_3_2_1B else "-",
        ])  # fmt: skip
    t = preset.train
    data = t.get("data", {})
    text = (
        f"Training (every variant): {t['model']}, {t.get('dtype', 'bfloat16')} base weights, "
        f"data {data.get('source')}{' ' + str(data['path']) if data.get('path') else ''}, "
        f"batch {t.get('batch_size')} x {data.get('max_length')} tokens, {t['max_steps']} steps, "
        f"lr {t.get('learning_rate')}, warmup {t.get('warmup_ratio')}, AdamW over the adapters "
        "only.\n\n"
    )
    text += _table(
        ["variant", "method", "rank", "alpha", "dropout", "positive term", "negative term",
         "lambda", "group norm", "identity start", f"trainable ({config.name or 'model'})",
         "trainable (Llama-3.2-1B)", "paper (Llama-3.2-1B)"],
        rows,
    )  # fmt: skip
    return text, []


# -- fig1 -----------------------------------------------------------------------------------
def render_fig1(repro: Reproduction, results: dict, out: Path) -> tuple[str, list[str]]:
    jobs = {j.name + ("-init" if j.init else ""): j for j in artifact_jobs("fig1", repro.preset)}
    head = ["model", "held-out loss at init", "held-out loss", "mix accuracy",
            "HumanEval pass@1", "distinct-2", "longest repeat (mean)"]  # fmt: skip
    lm_tasks: list[str] = []
    if "lm-eval" in jobs:
        found = results[BASE].get(jobs["lm-eval"].slot, {}).get("tasks", {})
        lm_tasks = sorted(found)
        head += [f"{t} acc" for t in lm_tasks]
    head.append("paper HumanEval (1B)")
    rows, bars = [], {}
    for name in _models(repro):
        r = results[name]
        final = r.get(jobs["heldout"].slot, {})
        init = r.get(jobs["heldout-init"].slot, final if name == BASE else {})
        humaneval = _summary(r.get(jobs["humaneval"].slot)).get(0, {})
        row = [
            name, init.get("loss", math.nan), final.get("loss", math.nan),
            final.get("accuracy", {}).get("all", math.nan), humaneval.get("score", math.nan),
            humaneval.get("distinct_2", math.nan), humaneval.get("longest_repeat_mean", math.nan),
        ]  # fmt: skip
        if lm_tasks:
            tasks = r.get(jobs["lm-eval"].slot, {}).get("tasks", {})
            row += [tasks.get(t, {}).get("acc,none", math.nan) for t in lm_tasks]
        general = paper.GENERAL.get(name)
        row.append(general[paper.GENERAL_TASKS.index("HumanEval")] if general else "-")
        rows.append(row)
        bars[name] = (row[3], row[4], *(row[7 : 7 + len(lm_tasks)]))
    metrics = ["mix accuracy", "HumanEval pass@1", *[f"{t} acc" for t in lm_tasks]]
    fig, ax = _subplots(figsize=(1.6 + 1.4 * len(metrics) * len(bars) / 4, 3.6))
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars.items()):
        ax.bar([m + i * width for m in range(len(metrics))], values, width, label=name)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(metrics))], metrics)
    ax.set_ylabel("score")
    ax.set_title("General abilities (Fig. 1)")
    ax.legend(fontsize=7, ncol=2)
    plots = [_save(fig, out / "fig1.png")]
    # training curves: the loss of every variant against the step
    fig, ax = _subplots(figsize=(6, 3.6))
    for variant in repro.preset.variants:
        curve = repro.training_curve(variant)
        if curve:
            ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], label=variant)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    plots.append(_save(fig, out / "fig1-training.png"))
    return _table(head, rows), plots


# -- fig2 / fig3 / rag: score against a sweep ------------------------------------------------
def _sweep(repro: Reproduction, results: dict, item: Job, sweep: Sequence[int]) -> list[list]:
    rows = []
    for name in _models(repro):
        summary = _summary(results[name].get(item.slot))
        rows.append([name, *[summary.get(v, {}).get("score", math.nan) for v in sweep]])
    return rows


def _plot_sweep(ax, rows: list[list], sweep: Sequence[int], xlabel: str, title: str) -> None:
    for row in rows:
        ax.plot(list(sweep), row[1:], marker="o", label=row[0])
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(sweep), [str(v) for v in sweep])
    ax.set_xlabel(xlabel)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)


def render_fig2(repro: Reproduction, results: dict, out: Path) -> tuple[str, list[str]]:
    (item,) = artifact_jobs("fig2", repro.preset)
    shots = repro.preset.eval.icl_shots
    rows = _sweep(repro, results, item, shots)
    fig, ax = _subplots(figsize=(6, 3.6))
    _plot_sweep(ax, rows, shots, "demonstrations", "Many-shot ICL (Fig. 2)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    text = _table(["model", *[f"{n} shots" for n in shots]], rows)
    return text, [_save(fig, out / "fig2.png")]


def render_fig3(repro: Reproduction, results: dict, out: Path) -> tuple[str, list[str]]:
    items = artifact_jobs("fig3", repro.preset)
    lengths = repro.preset.eval.nih_lengths
    fig, axes = _subplots(1, len(items), figsize=(4.2 * len(items), 3.6), squeeze=False)
    text = ""
    for ax, item in zip(axes[0], items):
        rows = _sweep(repro, results, item, lengths)
        text += f"**{item.name}** (score against context tokens)\n\n"
        text += _table(["model", *[str(n) for n in lengths]], rows) + "\n"
        _plot_sweep(ax, rows, lengths, "context tokens", item.name)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=7)
    return text, [_save(fig, out / "fig3.png")]


def render_rag(repro: Reproduction, results: dict, out: Path) -> tuple[str, list[str]]:
    (item,) = artifact_jobs("table1", repro.preset)
    sweep = repro.preset.eval.rag_distractors
    rows = _sweep(repro, results, item, sweep)
    for row in rows:
        rag = paper.RAG.get(row[0])
        row.append(rag[-1] if rag else "-")
    head = ["model", *[f"{k} distractors" for k in sweep], "paper avg (1B, 5 datasets)"]
    return _table(head, rows), []


# -- fig4 -----------------------------------------------------------------------------------
def render_fig4(repro: Reproduction, results: dict, out: Path) -> tuple[str, list[str]]:
    (item,) = artifact_jobs("fig4", repro.preset)
    rows, bars = [], {"positive": {}, "negative": {}}
    for name in _models(repro):
        for row in (results[name].get(item.slot) or {}).get("attention", []):
            rows.append([name, row["length"], row["map"], *[f"{row[s]:.2e}" for s in SEGMENTS]])
            bars[row["map"]][f"{name} ({row['length']})"] = [row[s] for s in SEGMENTS]
    head = ["model", "length", "map", *SEGMENTS]
    fig, axes = _subplots(1, 2, figsize=(11, 3.8))
    for ax, (term, found) in zip(axes, bars.items()):
        width = 0.8 / max(len(found), 1)
        for i, (label, values) in enumerate(found.items()):
            ax.bar([s + i * width for s in range(len(SEGMENTS))], values, width, label=label)
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(SEGMENTS))], list(SEGMENTS))
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_title(f"{term} map" + (" (scaled by lambda)" if term == "negative" else ""))
        ax.legend(fontsize=6)
    axes[0].set_ylabel("attention per token")
    fig.suptitle("Attention mass per segment (Fig. 4)")
    text = (
        "Per-token attention mass of each segment, from the query tokens, averaged over heads, "
        "layers and items; the negative map is scaled by lambda.\n\n" + _table(head, rows)
    )
    return text, [_save(fig, out / "fig4.png")]


RENDER = {
    "table2": render_table2,
    "fig1": render_fig1,
    "fig2": render_fig2,
    "fig3": render_fig3,
    "table1": render_rag,
    "table3": render_rag,
    "fig4": render_fig4,
}
TITLES = {
    "table2": "Table 2: hyperparameters and trainable parameters",
    "fig1": "Figure 1: general abilities",
    "fig2": "Figure 2: many-shot in-context learning",
    "fig3": "Figure 3: needle-in-a-haystack against context length",
    "table1": "Tables 1/3: RAG QA",
    "table3": "Tables 1/3: RAG QA",
    "fig4": "Figure 4: attention mass",
}


def expand(artifact: str) -> list[str]:
    """``all`` -> every artifact once (``table3`` is ``table1``'s table)."""
    if artifact == ALL:
        return [a for a in ARTIFACTS if a != "table3"]
    if artifact not in ARTIFACTS:
        raise ValueError(artifact)
    return [artifact]

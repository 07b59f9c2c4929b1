"""The paper's findings checked on crafted scores with known verdicts (both ways)."""

from __future__ import annotations

import pytest

from difflora_jax.reproduce import load_preset
from difflora_jax.reproduce.artifacts import artifact_jobs
from difflora_jax.reproduce.findings import check_findings, findings_table
from difflora_jax.reproduce.runner import BASE

PRESET = load_preset("cpu-small")
SEG = ("bos", "before", "needle", "after", "query")


def _summary(values: dict[int, float], repeat: float = 2.0) -> dict:
    return {
        "summary": [
            {"length": k, "score": v, "distinct_2": 0.9, "longest_repeat_mean": repeat}
            for k, v in values.items()
        ]
    }


def _results(score: dict[str, float], repeat: dict[str, float], init: dict[str, float],
             final: dict[str, float], icl_falls: bool, denoise: bool) -> dict:  # fmt: skip
    plan = PRESET.eval
    jobs = {
        j.name + ("-init" if j.init else ""): j
        for a in ("fig1", "fig2", "fig3", "table1", "fig4")
        for j in artifact_jobs(a, PRESET)
    }
    out = {}
    for model in (BASE, *PRESET.variants):
        x, r = score[model], repeat[model]
        shots = plan.icl_shots
        icl = {n: (x - 0.1 * i if icl_falls else x + 0.05 * i) for i, n in enumerate(shots)}
        pos = dict(zip(SEG, (0.01, 0.001, 0.002, 0.001, 0.003)))
        neg = dict(zip(SEG, (0.005, 0.0005, 0.0, 0.0005, 0.001) if denoise else (-0.005,) * 5))
        attention = [{"length": 1024, "map": "positive", **pos}]
        if model.startswith("difflora"):
            attention.append({"length": 1024, "map": "negative", **neg})
        out[model] = {
            jobs["heldout"].slot: {"loss": final[model], "accuracy": {"all": x}},
            **({} if model == BASE else {jobs["heldout-init"].slot: {"loss": init[model]}}),
            jobs["humaneval"].slot: _summary({0: x}, r),
            jobs["lm-eval"].slot: {"tasks": {"difflora_mix_mc": {"acc,none": x}}},
            jobs["icl"].slot: _summary(icl, r),
            jobs["rag"].slot: _summary({n: x for n in plan.rag_distractors}, r),
            jobs["attention-mass"].slot: {"attention": attention},
            **{jobs[t].slot: _summary({n: x for n in plan.nih_lengths}, r) for t in plan.nih_tasks},
        }
    return out


def _verdicts(results: dict) -> dict[str, str]:
    rows = check_findings(PRESET, results)
    assert findings_table(rows).count("\n") == len(rows) + 2
    return {r["finding"].split(" (")[0]: r["verdict"] for r in rows}


def _per_model(default: float, **values: float) -> dict[str, float]:
    models = (BASE, *PRESET.variants)
    return {m: values.get(m.replace("-", "_"), default) for m in models}


def test_findings_that_hold():
    score = _per_model(0.5, base=0.6, lora_r8=0.8, difflora_32_gn=0.0)
    repeat = _per_model(10.0, base=2.0, lora_r8=2.0)
    init = _per_model(5.0, base=2.0, lora_r8=2.0, difflora_identity=2.0)
    final = _per_model(1.5, base=2.0, difflora_identity=1.0)
    v = _verdicts(_results(score, repeat, init, final, icl_falls=True, denoise=True))
    assert v["LoRA beats DiffLoRA on most tasks"] == "holds"
    assert v["DiffLoRA is ahead of LoRA on HumanEval"] == "does not hold"
    assert v["DiffLoRA-32 + GN destroys the pretrained model"] == "holds"
    assert v["many-shot ICL degrades with more demonstrations"] == "holds"
    assert v["DiffLoRA sometimes generates degenerate text"] == "holds"
    assert v["attention mass on BOS drops slightly and the context around the needle is denoised"] == "holds"  # fmt: skip
    assert v["(ours) the identity start keeps the base model at step 0 and ends no worse"] == "holds"  # fmt: skip


def test_findings_that_do_not_hold():
    score = _per_model(0.8, base=0.6, lora_r8=0.5)
    repeat = _per_model(1.0, base=2.0, lora_r8=2.0)
    init = _per_model(5.0, base=2.0)  # the identity start is not at the base model
    final = _per_model(1.5, base=2.0, difflora_identity=1.0)
    v = _verdicts(_results(score, repeat, init, final, icl_falls=False, denoise=False))
    for finding in (
        "LoRA beats DiffLoRA on most tasks",
        "DiffLoRA-32 + GN destroys the pretrained model",
        "many-shot ICL degrades with more demonstrations",
        "DiffLoRA sometimes generates degenerate text",
        "attention mass on BOS drops slightly and the context around the needle is denoised",
    ):
        assert v[finding] == "does not hold", finding
    assert v["DiffLoRA is ahead of LoRA on HumanEval"] == "holds"
    assert v["DiffLoRA is ahead on multi-value needle retrieval"] == "holds"
    assert v["(ours) the identity start keeps the base model at step 0 and ends no worse"] == "does not hold"  # fmt: skip


def test_missing_scores_are_not_measurable():
    rows = check_findings(PRESET, {m: {} for m in (BASE, *PRESET.variants)})
    assert {r["verdict"] for r in rows} <= {"not measurable", "does not hold"}
    assert any(r["verdict"] == "not measurable" for r in rows)


@pytest.mark.parametrize("variants", [["lora-r8"], ["difflora-32"]])
def test_presets_without_the_compared_variants_skip_those_findings(variants):
    preset = load_preset("cpu-small", [f"variants={variants}"])
    rows = check_findings(preset, {m: {} for m in (BASE, *variants)})
    assert "LoRA beats DiffLoRA on most tasks" not in {r["finding"] for r in rows}

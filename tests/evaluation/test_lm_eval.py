"""The lm-evaluation-harness plug-in run for real: local task YAMLs over JSONL files
(multiple choice, rolling loglikelihood, generate_until); the harness's loglikelihoods equal
the model's own (one unpadded forward pass per sequence), its generations equal ours, and the
``difflora lm-eval`` command finds the registered model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from difflora_jax.cli import main
from difflora_jax.evaluation.lm_eval_model import DiffLoRALM
from difflora_jax.generation import generate

MC = [
    {"question": "Cats say", "choices": [" meow", " woof"], "answer": 0},
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
]
TEXTS = [{"text": "A short line of text for the rolling loglikelihood."}]
QA = [{"question": "Q: two plus two?\\nA:", "answer": "4"}]


def _write_tasks(root):
    files = {"mc": MC, "roll": TEXTS, "gen": QA}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        f"task: dl_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root}/mc.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    (root / "roll.yaml").write_text(
        f"task: dl_roll\n{common}dataset_kwargs:\n  data_files:\n    test: {root}/roll.jsonl\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n"
    )
    (root / "gen.yaml").write_text(
        f"task: dl_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root}/gen.jsonl\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def _own_loglikelihood(lm: DiffLoRALM, context: str, continuation: str) -> float:
    """log p(continuation | context) from one unpadded forward pass of the model itself."""
    ctx, cont = lm._pair(context, continuation)
    ids = np.asarray([ctx + cont], np.int32)
    logits = np.asarray(lm.model(ids), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_harness_loglikelihoods_and_generations_are_the_models_own(tiny_hf_dir, tmp_path):
    _write_tasks(tmp_path)
    lm = DiffLoRALM(model=str(tiny_hf_dir), batch_size=2)
    results = simple_evaluate(
        model=lm,
        tasks=["dl_mc", "dl_roll", "dl_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    assert results is not None
    samples = results["samples"]
    compared = 0
    for sample in samples["dl_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ll, _ = resp[0]
            assert ll == pytest.approx(_own_loglikelihood(lm, context, continuation), abs=1e-4)
            compared += 1
    assert compared == 5
    (roll,) = samples["dl_roll"]
    text = TEXTS[0]["text"]
    want = _own_loglikelihood(lm, "", text)  # the prefix token, then every token of the text
    assert roll["resps"][0][0] == pytest.approx(want, abs=1e-3)
    assert math.isfinite(results["results"]["dl_roll"]["word_perplexity,none"])
    (gen,) = samples["dl_gen"]
    (ours,) = generate(lm.model, lm.tokenizer, [QA[0]["question"]], max_new_tokens=6, stop=["\n"])
    assert gen["resps"][0][0] == ours.text


def test_difflora_lm_eval_command_finds_the_model(tiny_hf_dir, tmp_path, capsys):
    _write_tasks(tmp_path)
    out = tmp_path / "out"
    code = 0
    try:
        main(
            ["lm-eval", "--model", "difflora_jax", "--model_args", f"model={tiny_hf_dir}",
             "--tasks", "dl_mc", "--include_path", str(tmp_path), "--output_path", str(out)]
        )  # fmt: skip
    except SystemExit as e:  # the harness's command line may exit
        code = int(e.code or 0)
    assert code == 0
    assert "dl_mc" in capsys.readouterr().out

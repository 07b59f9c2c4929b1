"""``difflora eval`` end to end on a tiny model (files, table, refusals), and the HumanEval
runner scoring a perfect and a wrong "model" (generation replaced by known completions)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from difflora_jax.cli import main
from difflora_jax.evaluation import suite
from difflora_jax.evaluation.humaneval import load_problems


def test_eval_cli_writes_results_and_a_table(tiny_hf_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_hf_dir), "--task", "nih-single,nih-mk2"]
    args += ["--lengths", "470", "--num", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in results["records"]] == ["nih-single"] * 2 + ["nih-mk2"] * 2
    assert all(0.0 <= r["score"] <= 1.0 for r in results["records"])
    assert {(r["task"], r["length"], r["n"]) for r in results["summary"]} == {
        ("nih-single", 470, 2),
        ("nih-mk2", 470, 2),
    }
    table = (out / "table.md").read_text()
    assert "| nih-mk2 | 470 | 2 |" in table and "difflora eval" in table
    # an existing non-empty --out is refused, and left as it was
    assert main(args) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == results


def test_eval_cli_attention_mass(tmp_path, tiny_hf_dir):
    out = tmp_path / "mass"
    args = ["eval", "--model", str(tiny_hf_dir), "--adapter", "difflora-32", "--task"]
    args += ["attention-mass", "--lengths", "450", "--num", "2", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2
    for r in records:
        assert sum(r["positive"]["share"].values()) == pytest.approx(1.0, abs=1e-5)
    table = (out / "table.md").read_text()
    assert "| 450 | positive | 2 |" in table and "| 450 | negative | 2 |" in table


def test_eval_cli_refuses_unknown_tasks_and_lengths_beyond_the_model(tiny_hf_dir, tmp_path, capsys):
    assert (
        main(
            ["eval", "--model", str(tiny_hf_dir), "--task", "nih-xx", "--out", str(tmp_path / "a")]
        )
        == 1
    )
    assert "unknown task 'nih-xx'" in capsys.readouterr().err
    args = ["eval", "--model", str(tiny_hf_dir), "--task", "nih-single", "--lengths", "4096"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 1
    assert "exceed the model's 512 positions" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("perfect", [True, False], ids=["perfect", "wrong"])
def test_humaneval_runner_scores_known_completions(monkeypatch, perfect):
    problems = {p["prompt"]: p for p in load_problems()[:3]}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        assert kwargs["stop"] == suite.HUMANEVAL_STOPS
        texts = [
            problems[p]["canonical_solution"] if perfect else "    return None\n" for p in prompts
        ]
        return [SimpleNamespace(text=t, finish_reason="stop") for t in texts]

    monkeypatch.setattr(suite, "generate", fake_generate)
    records = suite.evaluate_humaneval(None, None, num=3, batch_size=2, progress=False)  # type: ignore[arg-type]
    assert [r["task_id"] for r in records] == [f"HumanEval/{i}" for i in range(3)]
    (row,) = suite.summarize(records)
    assert row["score"] == (1.0 if perfect else 0.0)
    assert all(r["status"] == ("passed" if perfect else "failed") for r in records)

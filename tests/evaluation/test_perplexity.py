"""Perplexity: windowed negative log-likelihood equals a hand computation from the model's
logits, every token is predicted once, the summary is exp(total NLL / total tokens), and the
task runs through ``difflora eval`` on a text file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from difflora_jax.cli import main
from difflora_jax.evaluation.perplexity import document_nll, load_documents
from difflora_jax.evaluation.suite import summarize
from tests.tiny import tiny_model


def _hand_nll(model, tokens) -> float:
    logits = np.asarray(model(np.asarray([tokens], np.int32)), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-sum(logp[i, t] for i, t in enumerate(tokens[1:])))


@pytest.mark.parametrize("window", [None, 8, 5])
def test_windowed_nll_is_a_hand_computation(window):
    model = tiny_model(None)
    tokens = list(np.random.default_rng(1).integers(0, 256, 20))
    nll, count = document_nll(model, tokens, window)
    assert count == 19
    if window is None:
        want = _hand_nll(model, tokens)
    else:  # windows overlap by one token: each token predicted once, from its window
        want, start = 0.0, 0
        while start < len(tokens) - 1:
            want += _hand_nll(model, tokens[start : start + window])
            start += window - 1
    assert nll == pytest.approx(want, rel=1e-5)


def test_summary_is_token_weighted():
    records = [
        {"task": "perplexity", "length": 0, "nll": 2.0, "tokens": 1},
        {"task": "perplexity", "length": 0, "nll": 6.0, "tokens": 3},
    ]
    (row,) = summarize(records)
    assert row["score"] == pytest.approx(math.exp(8.0 / 4))


def test_documents_and_the_cli(tiny_hf_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("First document, two lines.\nStill the first.\n\nSecond document.\n")
    assert load_documents(text) == [
        "First document, two lines.\nStill the first.",
        "Second document.",
    ]
    assert len(load_documents(None, num=3)) == 3
    out = tmp_path / "ppl"
    args = ["eval", "--model", str(tiny_hf_dir), "--task", "perplexity", "--data", str(text)]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    (row,) = json.loads((out / "results.json").read_text())["summary"]
    assert row["task"] == "perplexity" and row["n"] == 2 and 1.0 < row["score"] < 1e4

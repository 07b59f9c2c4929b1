"""Attention mass per segment: the model's maps equal the NumPy reference's (a hand computation
of the tiny DiffLoRA model), the segment masses equal those computed by hand from the reference
maps, and on a needle prompt the shares of each layer sum to 1 (positive map) and to lambda
(negative map)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from difflora_jax.config import AdapterConfig
from difflora_jax.evaluation.attention_mass import (
    SEGMENTS,
    attention_mass,
    nih_segments,
    segment_mass,
)
from difflora_jax.evaluation.nih import make_nih
from difflora_jax.modeling.adapters import lambda_values
from difflora_jax.weights.loading import load_model
from tests.modeling.reference_difflora import reference_logits
from tests.modeling.test_adapters import adapted, base_models, params_of  # noqa: F401 (a fixture)

DIFF = AdapterConfig(method="difflora", rank=4, alpha=8.0, negative_term="adapters")


@pytest.mark.parametrize("adapter", [None, DIFF], ids=["base", "difflora"])
def test_maps_and_masses_match_a_hand_computation(base_models, adapter):  # noqa: F811
    shape = next(iter(base_models))
    model = adapted(base_models, shape, adapter) if adapter else base_models[shape]
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 12))
    ref_maps: list = []
    reference_logits(params_of(model), model.config, adapter, ids, maps=ref_maps)
    rows = np.arange(8, 12)
    ours = model.attention_maps(np.asarray(ids, np.int32), query_rows=rows)
    assert len(ours) == len(ref_maps) == model.config.num_layers
    for (pos, neg), (ref_pos, ref_neg) in zip(ours, ref_maps):
        np.testing.assert_allclose(np.asarray(pos), ref_pos[:, :, rows], atol=1e-5)
        if adapter is None:
            assert neg is None and ref_neg is None
        else:
            np.testing.assert_allclose(np.asarray(neg), ref_neg[:, :, rows], atol=1e-5)
    spans = {"bos": (0, 1), "before": (1, 5), "needle": (5, 7), "after": (7, 8), "query": (8, 12)}
    mass = segment_mass(ours, spans)
    # by hand: mean over heads and query rows of the summed probabilities, then over layers
    for name, index in (("positive", 0), ("negative", 1)):
        if adapter is None and name == "negative":
            assert "negative" not in mass
            continue
        for segment, (a, b) in spans.items():
            by_layer = [m[index][0][:, rows, a:b].sum(-1).mean() for m in ref_maps]
            want = float(np.mean(by_layer))
            assert mass[name]["share"][segment] == pytest.approx(want, abs=1e-5)
            assert mass[name]["per_token"][segment] == pytest.approx(want / (b - a), abs=1e-5)


def test_needle_prompt_segments_and_totals(tiny_hf_dir):
    model, tokenizer = load_model(tiny_hf_dir, adapter=DIFF)
    item = make_nih("nih-mk2", 450, tokenizer, seed=2)
    ids, spans = nih_segments(tokenizer, item)
    # the segments tile the prompt, and the needle span decodes to the needle's text
    bounds = [spans[s] for s in SEGMENTS]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(ids)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(bounds))
    needle = next(n for n in item.needles if n.key in item.question)
    assert tokenizer.decode(ids[slice(*spans["needle"])]).strip() == needle.text
    assert item.question in tokenizer.decode(ids[slice(*spans["query"])])
    mass = attention_mass(model, tokenizer, item)
    lambdas = np.asarray(lambda_values(model))
    for layer, lam in zip(mass["per_layer"], lambdas):
        assert sum(layer["positive"]["share"].values()) == pytest.approx(1.0, abs=1e-5)
        assert sum(layer["negative"]["share"].values()) == pytest.approx(float(lam), abs=1e-5)

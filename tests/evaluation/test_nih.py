"""Needle-in-a-haystack items: needles where they say, prompts of the asked length, the right
gold values; a RULER-style JSONL loads; and SmolLM2-135M-Instruct, the real model, retrieves a
single needle at 1024 tokens in most of 20 seeded items."""

from __future__ import annotations

import json

import pytest

from difflora_jax.errors import DataError
from difflora_jax.evaluation.nih import TASKS, _prompt_tokens, load_nih_data, make_nih
from difflora_jax.evaluation.suite import evaluate_nih, summarize


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", [256, 1000])
def test_needles_sit_where_the_item_says(smollm2_tokenizer, task, length):
    item = make_nih(task, length, smollm2_tokenizer, seed=3)
    tokens = _prompt_tokens(smollm2_tokenizer, item.prompt)
    assert length - 40 <= tokens <= length  # filled to the length, never over it
    expected = {"nih-single": 1, "nih-mk2": 2, "nih-mk3": 3, "nih-mv": 4}[task]
    assert len(item.needles) == expected
    for needle in item.needles:
        assert item.context[needle.start : needle.end] == needle.text
        assert needle.key in needle.text and needle.value in needle.text
        assert item.context.count(needle.value) == 1
    positions = [n.start for n in item.needles]
    assert positions == sorted(positions)
    # depth d puts a needle after round(d * n) of the n filler sentences
    n = item.context.count(".") - len(item.needles)
    for i, needle in enumerate(item.needles):
        before = item.context[: needle.start].count(".") - i
        assert before == round(needle.depth * n), (before, needle.depth, n)
    asked = [n for n in item.needles if n.key in item.question]
    assert sorted(item.answers) == sorted(n.value for n in asked)
    assert len(item.answers) == (4 if task == "nih-mv" else 1)
    if task in ("nih-mk2", "nih-mk3"):  # the other keys are distractors, not asked for
        assert len({n.key for n in item.needles}) == expected


def test_items_are_seeded(smollm2_tokenizer):
    a = make_nih("nih-mk2", 300, smollm2_tokenizer, seed=1)
    assert a == make_nih("nih-mk2", 300, smollm2_tokenizer, seed=1)
    assert a != make_nih("nih-mk2", 300, smollm2_tokenizer, seed=2)


def test_ruler_jsonl(tmp_path):
    path = tmp_path / "nih.jsonl"
    rows = [
        {"input": "The magic number is 123. What is the number?", "outputs": ["123"], "length": 9},
        {"context": "k1 is 5.", "question": "What is k1?", "answers": "5"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_nih_data(path)
    assert [i.answers for i in items] == [("123",), ("5",)]
    assert items[1].prompt.endswith("What is k1?")
    path.write_text('{"input": "no answers"}')
    with pytest.raises(DataError, match=r"nih\.jsonl:1"):
        load_nih_data(path)


def test_smollm2_retrieves_a_single_needle_at_1024_tokens(smollm2):
    model, tokenizer = smollm2
    items = [make_nih("nih-single", 1024, tokenizer, seed=s) for s in range(20)]
    records = evaluate_nih(model, tokenizer, items, batch_size=4, progress=False)
    (row,) = summarize(records)
    assert row["n"] == 20
    assert row["score"] >= 0.6, [(r["answers"], r["output"]) for r in records]

"""Many-shot ICL and RAG items: demonstrations follow the hidden rule with arbitrary label ids,
the gold document is the only one that answers, scoring of crafted outputs, the JSONL loaders,
and both tasks through ``difflora eval`` on a tiny model."""

from __future__ import annotations

import json
import re

import pytest

from difflora_jax.cli import main
from difflora_jax.errors import DataError
from difflora_jax.evaluation.icl import CATEGORIES, icl_score, load_icl_data, make_icl
from difflora_jax.evaluation.rag import load_rag_data, make_rag


def _category(text: str) -> str:
    (found,) = [
        c for c, words in CATEGORIES.items() if any(re.search(rf"\b{w}\b", text) for w in words)
    ]
    return found


@pytest.mark.parametrize("shots", [4, 16, 64])
def test_icl_demonstrations_follow_the_hidden_rule(shots):
    item = make_icl(shots, seed=5)
    pairs = re.findall(r"Input: (.*)\nLabel: (\d+)", item.prompt)
    assert len(pairs) == shots
    assert item.prompt.endswith("\nLabel:")
    query = item.prompt.rsplit("Input: ", 1)[1].split("\n")[0]
    # one id per category, ids arbitrary (not the category words), the query's id is its category's
    for text, label in pairs:
        assert item.labels[_category(text)] == label
    assert item.answer == item.labels[_category(query)]
    assert len(set(item.labels.values())) == len(item.labels)
    assert make_icl(shots, seed=5) == item and make_icl(shots, seed=6) != item


def test_icl_score():
    assert icl_score(" 47\nInput: x", "47") == 1.0
    assert icl_score("47.", "47") == 1.0
    assert icl_score("4", "47") == 0.0
    assert icl_score("", "47") == 0.0


@pytest.mark.parametrize("k", [2, 9, 30])
def test_rag_gold_document_is_the_only_answer(k):
    item = make_rag(k, seed=3)
    assert len(item.documents) == k + 1 and len(set(item.documents)) == k + 1
    person = item.question.split("does ")[1].split(" work")[0]
    job = item.question.split("as a ")[1].split("?")[0]
    (city,) = item.answers
    assert item.documents[item.gold] == f"{person} works as a {job} in {city}."
    answering = [d for d in item.documents if person in d and job in d and city in d]
    assert answering == [item.documents[item.gold]]
    # every distractor shares an entity with the gold document
    for i, doc in enumerate(item.documents):
        if i != item.gold:
            assert person in doc or job in doc or city in doc


def test_loaders(tmp_path):
    icl = tmp_path / "icl.jsonl"
    icl.write_text(
        '{"text": "how far is the moon", "label": "NUM"}\n{"text": "who", "label": "HUM"}\n'
    )
    assert load_icl_data(icl) == [("how far is the moon", "NUM"), ("who", "HUM")]
    rag = tmp_path / "rag.jsonl"
    row = {"question": "q?", "documents": ["a", {"title": "T", "text": "b"}], "answers": "x"}
    rag.write_text(json.dumps(row))
    (item,) = load_rag_data(rag)
    assert item.documents == ("a", "(Title: T) b") and item.answers == ("x",)
    rag.write_text('{"question": "q"}')
    with pytest.raises(DataError, match=r"rag\.jsonl:1"):
        load_rag_data(rag)


def test_icl_and_rag_through_the_cli(tiny_hf_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_hf_dir), "--task", "icl,rag", "--shots", "2,4"]
    args += ["--distractors", "2", "--num", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {(r["task"], r["length"], r["n"]) for r in summary} == {
        ("icl", 2, 2),
        ("icl", 4, 2),
        ("rag", 2, 2),
    }

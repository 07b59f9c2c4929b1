"""Real evaluation data from a JSONL file, a Hugging Face `datasets` split or a TFDS dataset:
the same rows, and the same items, whichever way they come."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difflora_jax.errors import AssetNotFoundError, DataError
from difflora_jax.evaluation.icl import load_icl_data
from difflora_jax.evaluation.nih import load_nih_data
from difflora_jax.evaluation.rag import load_rag_data
from difflora_jax.evaluation.rows import read_rows

ICL = [{"text": "how far is the moon", "label": "NUM"}, {"text": "who wrote it", "label": "HUM"}]
RAG = [{"question": "Where?", "documents": ["a", {"title": "T", "text": "b"}], "answers": "b"}]
NIH = [{"context": "... the key is 42 ...", "question": "What is the key?", "outputs": ["42"]}]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_jsonl_rows_and_errors_name_the_line(tmp_path):
    path = _jsonl(tmp_path / "icl.jsonl", ICL)
    assert [row for _, row in read_rows(path)] == ICL
    assert load_icl_data(path) == [("how far is the moon", "NUM"), ("who wrote it", "HUM")]
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": "y"}\n{"text": "no label"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*label"):
        load_icl_data(tmp_path / "bad.jsonl")
    with pytest.raises(AssetNotFoundError, match="hf:NAME"):
        load_icl_data(tmp_path / "missing.jsonl")


def test_hf_dataset_gives_the_jsonl_items(tmp_path):
    datasets = pytest.importorskip("datasets")
    for name, rows, load in (("icl", ICL, load_icl_data), ("rag", RAG, load_rag_data),
                             ("nih", NIH, load_nih_data)):  # fmt: skip
        if name == "rag":  # datasets needs one type per column: documents as title/text dicts
            rows = [{**RAG[0], "documents": [{"title": "", "text": "a"}, {"title": "T", "text": "b"}]}]  # fmt: skip
        datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(
            tmp_path / name
        )
        from_jsonl = load(_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert load(f"hf:{tmp_path / name}") == from_jsonl
        assert load(f"hf:{tmp_path / name}:test") == from_jsonl
    with pytest.raises(DataError, match="no split 'train'"):
        load_icl_data(f"hf:{tmp_path / 'icl'}:train")


def test_tfds_rows_decode_bytes(monkeypatch):
    """A TFDS array_record source yields NumPy bytes and arrays; the rows come out plain."""
    import tensorflow_datasets as tfds

    records = [{"text": np.bytes_(b"how far is the moon"), "label": b"NUM"}]
    calls = []

    def fake_source(name, split):
        calls.append((name, split))
        return records

    monkeypatch.setattr(tfds, "data_source", fake_source)
    assert load_icl_data("tfds:trec:train") == [("how far is the moon", "NUM")]
    assert load_icl_data("tfds:trec") == [("how far is the moon", "NUM")]
    assert calls == [("trec", "train"), ("trec", "test")]

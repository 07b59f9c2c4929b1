"""Example sources: JSONL (errors name file and line), HF ``datasets`` (saved to disk, or a local
data directory through ``load_dataset``), and TFDS array_record built here without TensorFlow."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from difflora_jax.data import (
    DataError,
    SFTBatchIterator,
    load_hf_dataset,
    load_jsonl,
    load_tfds,
    make_mix,
    normalize_example,
)
from difflora_jax.errors import AssetNotFoundError

EXAMPLES = make_mix(6, seed=0)


def plain(example):
    return {"messages": example["messages"], "answer": example["answer"], "task": example["task"]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- JSONL -------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n\n" + json.dumps(EXAMPLES[1]) + "\n")
    assert load_jsonl(path) == EXAMPLES[:2]  # the blank line is skipped


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [', r":3: invalid JSON"),
        ('{"text": "hi"}', r":3: example has no 'messages' field"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r":3: message 0 has role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r":3: conversation has no assistant"),
        ("[1, 2]", r":3: a row must be a dict"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps(EXAMPLES[1]) + "\n" + line + "\n")
    with pytest.raises(DataError, match="bad.jsonl" + message):
        load_jsonl(path)


def test_jsonl_missing_or_empty(tmp_path):
    with pytest.raises(AssetNotFoundError, match=r"nope\.jsonl does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_normalize_example_forms():
    messages = EXAMPLES[0]["messages"]
    as_json = normalize_example({"messages": json.dumps(messages).encode(), "id": np.int64(3)})
    assert as_json == {"messages": messages, "id": 3}
    columns = {
        "role": np.array([m["role"].encode() for m in messages], dtype=object),
        "content": [m["content"].encode() for m in messages],
    }
    assert normalize_example({"messages": columns})["messages"] == messages
    with pytest.raises(DataError, match="row 4: 'messages' is a string but not valid JSON"):
        normalize_example({"messages": "[{"}, "row 4")
    with pytest.raises(DataError, match="holds 2 roles but 1 contents"):
        normalize_example({"messages": {"role": ["user", "assistant"], "content": ["x"]}})


# --- Hugging Face datasets ----------------------------------------------------------------------


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.disable_progress_bars()
    return datasets


def test_hf_save_to_disk(tmp_path, hf_datasets):
    rows = [plain(e) for e in EXAMPLES]
    hf_datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "single")
    source = load_hf_dataset(tmp_path / "single")
    assert len(source) == 6 and source[2] == rows[2] and source[-1] == rows[-1]
    assert source[1:3] == rows[1:3]
    hf_datasets.DatasetDict(
        {
            "train": hf_datasets.Dataset.from_list(rows[:4]),
            "test": hf_datasets.Dataset.from_list(rows[4:]),
        }
    ).save_to_disk(tmp_path / "dict")
    test = load_hf_dataset(tmp_path / "dict", split="test")
    assert [test[i] for i in range(len(test))] == rows[4:]
    with pytest.raises(DataError, match=r"has no split 'validation'; it holds \['test', 'train'\]"):
        load_hf_dataset(tmp_path / "dict", split="validation")


def test_hf_load_dataset_local_directory(tmp_path, hf_datasets):
    directory = tmp_path / "jsonl_dir"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", [plain(e) for e in EXAMPLES[:4]])
    write_jsonl(directory / "test.jsonl", [plain(e) for e in EXAMPLES[4:]])
    source = load_hf_dataset(directory, split="train")
    assert len(source) == 4 and source[3] == plain(EXAMPLES[3])
    assert load_hf_dataset(directory, split="test")[0] == plain(EXAMPLES[4])


def test_hf_errors(tmp_path, hf_datasets):
    hf_datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(tmp_path / "no_messages")
    with pytest.raises(DataError, match=r"has no 'messages' column \(columns: \['text'\]\)"):
        load_hf_dataset(tmp_path / "no_messages")
    bad = [{"messages": [{"role": "user", "content": "q"}]}]
    hf_datasets.Dataset.from_list(bad).save_to_disk(tmp_path / "no_answer")
    with pytest.raises(DataError, match=r"no_answer\[train\] row 0: conversation has no assistant"):
        load_hf_dataset(tmp_path / "no_answer")[0]


# --- TFDS (array_record, no TensorFlow) ---------------------------------------------------------


def _builders():
    """Two tiny TFDS builders, defined once (TFDS registers builder classes by name).

    ``code_path = None``: for a builder defined inside a package, TFDS 4.9 looks for a checksums
    file next to its code through the ``importlib_resources`` backport, which only Python < 3.9
    installs; without a code path it skips that (these builders download nothing).
    """
    import tensorflow_datasets as tfds

    def examples(n):
        for i, e in enumerate(EXAMPLES[:n]):
            yield i, {"messages": json.dumps(e["messages"]), "answer": e["answer"]}

    class DiffloraTestChatJson(tfds.core.GeneratorBasedBuilder):
        """``messages`` stored as a JSON string feature."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            features = {"messages": tfds.features.Text(), "answer": tfds.features.Text()}
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": examples(6), "test": examples(2)}

        def _generate_examples(self):  # unused: splits are given as generators
            raise NotImplementedError

    class DiffloraTestChatSequence(tfds.core.GeneratorBasedBuilder):
        """``messages`` stored as a ``Sequence({"role", "content"})`` feature."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            message = {"role": tfds.features.Text(), "content": tfds.features.Text()}
            features = tfds.features.FeaturesDict({"messages": tfds.features.Sequence(message)})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": ((i, {"messages": e["messages"]}) for i, e in enumerate(EXAMPLES))}

        def _generate_examples(self):
            raise NotImplementedError

    return DiffloraTestChatJson, DiffloraTestChatSequence


class _HideTensorFlow:
    """Wraps a ``sys.meta_path`` finder so that TensorFlow is not found, as if uninstalled
    (``find_spec`` gives None, ``import tensorflow`` fails). Not ``sys.modules["tensorflow"] =
    None``: etils takes any key there as TensorFlow being loaded."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find_spec = getattr(self._finder, "find_spec", None)
        return None if find_spec is None else find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self._finder, name)


@pytest.fixture(scope="module")
def no_tensorflow():
    if "tensorflow" in sys.modules:
        pytest.skip("TensorFlow is already imported; cannot test the path without it")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "meta_path", [_HideTensorFlow(f) for f in sys.meta_path])
        assert importlib.util.find_spec("tensorflow") is None
        yield
        assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, no_tensorflow):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    data_dir = tmp_path_factory.mktemp("tfds")
    for builder in _builders():
        builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def canonical(examples):
    return sorted(json.dumps(e, sort_keys=True) for e in examples)


def test_tfds_array_record_without_tensorflow(tfds_dir):
    files = sorted(p.name for p in (tfds_dir / "difflora_test_chat_json" / "1.0.0").iterdir())
    assert "difflora_test_chat_json-train.array_record-00000-of-00001" in files
    source = load_tfds("difflora_test_chat_json", split="train", data_dir=tfds_dir)
    assert len(source) == 6
    expected = [{"messages": e["messages"], "answer": e["answer"]} for e in EXAMPLES]
    # TFDS shuffles records when writing; the content is the same
    assert canonical(source[i] for i in range(6)) == canonical(expected)
    assert isinstance(source[0]["answer"], str)
    test = load_tfds("difflora_test_chat_json", split="test", data_dir=tfds_dir)
    assert canonical(test[:]) == canonical(expected[:2])
    sliced = load_tfds("difflora_test_chat_json", split="train[:3]", data_dir=tfds_dir)
    assert len(sliced) == 3


def test_tfds_sequence_feature(tfds_dir):
    source = load_tfds("difflora_test_chat_sequence", split="train", data_dir=tfds_dir)
    assert canonical(source[:]) == canonical({"messages": e["messages"]} for e in EXAMPLES)


def test_tfds_feeds_the_pipeline(tfds_dir, smollm2_tokenizer):
    source = load_tfds("difflora_test_chat_json", split="train", data_dir=tfds_dir)
    batches = SFTBatchIterator(source, smollm2_tokenizer, batch_size=2, max_length=256)
    batch = next(batches)
    assert batch["input_ids"].shape == (2, 256) and batch["loss_mask"].sum() > 0


def test_tfds_errors(tfds_dir):
    with pytest.raises(DataError, match="cannot open TFDS dataset 'difflora_test_chat_json'"):
        load_tfds("difflora_test_chat_json", split="validation", data_dir=tfds_dir)
    with pytest.raises(DataError, match="cannot open TFDS dataset 'no_such_dataset_xyz'"):
        load_tfds("no_such_dataset_xyz", data_dir=tfds_dir)

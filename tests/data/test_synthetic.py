"""The synthetic instruction mix: deterministic, held out by construction, answers that are
right, and short enough for a 135M model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from difflora_jax.data import (
    TASKS,
    contains_answer,
    encode_chats,
    exact_match,
    make_item,
    make_mix,
    normalize_answer,
    prompt_messages,
    prompt_split,
    validate_messages,
)
from difflora_jax.errors import ConfigError


def prompt(item):
    return item["messages"][0]["content"]


def test_deterministic_and_prefix_stable():
    a = make_mix(40, seed=3)
    assert a == make_mix(40, seed=3)
    assert make_mix(15, seed=3) == a[:15]
    assert [prompt(x) for x in make_mix(40, seed=4)] != [prompt(x) for x in a]
    assert [x["task"] for x in a[:10]] == list(TASKS) * 2
    assert make_mix(4, seed=0, tasks=["copy"]) == [make_item("copy", 0, i) for i in range(4)]


def test_train_and_eval_share_no_prompt():
    train = make_mix(1000, seed=0, split="train")
    evals = make_mix(300, seed=0, split="eval") + make_mix(300, seed=1, split="eval")
    train_prompts = {prompt(x) for x in train}
    eval_prompts = {prompt(x) for x in evals}
    assert not train_prompts & eval_prompts
    assert all(prompt_split(p) == "train" for p in train_prompts)
    assert all(prompt_split(p) == "eval" for p in eval_prompts)
    # the splits are distinct draws, not a relabelling: nearly all prompts are unique
    assert len(train_prompts) > 990 and len(eval_prompts) > 590


def test_items_format_and_answers():
    for item in make_mix(200, seed=1, split="eval"):
        messages = validate_messages(item)
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["content"] == item["answer"] != ""
        assert prompt_messages(item) == messages[:1]
        text, answer, task = prompt(item), item["answer"], item["task"]
        if task == "context_retrieval":
            match = re.search(r"What is the (.+) of the (\w+ \w+)\?", text)
            obj, key = match.groups()
            facts = re.findall(rf"The {obj} of the (\w+ \w+) is (\d+)\.", text)
            assert len(facts) >= 3  # the asked fact plus distractors sharing a word with its key
            assert dict(facts)[key] == answer
            assert all(set(k.split()) & set(key.split()) for k, _ in facts)
        elif task == "kv_lookup":
            key = re.search(r"the key (\w+)\?", text).group(1)
            assert f"\n{key}: {answer}\n" in text
        elif task == "multidoc_qa":
            person = re.search(r"in which city does (.+) work\?", text).group(1)
            docs = re.findall(r"Document \d+: (.+)", text)
            gold = [d for d in docs if d.startswith(f"{person} works as")]
            assert len(gold) == 1 and gold[0].endswith(f" in {answer}.")
            distractors = [d for d in docs if d != gold[0]]
            assert 2 <= len(distractors) <= 4
            # each shares the person (another fact) or the relation (another person)
            assert all(person in d or " works as a " in d for d in distractors)
        elif task == "copy":
            assert text.endswith("\n" + answer)
        elif task == "count":
            target = re.search(r"the word (\w+) appear", text).group(1)
            words = text.split("\n")[1].split(", ")
            assert answer == str(words.count(target))
        else:
            pytest.fail(f"unknown task {task}")


def test_lengths_fit_a_small_model(smollm2_tokenizer):
    items = make_mix(250, seed=0)
    lengths = np.array([len(e) for e in encode_chats(items, smollm2_tokenizer)])
    assert lengths.max() <= 320
    assert 60 <= np.median(lengths) <= 200


def test_scoring():
    assert normalize_answer("  Lisbon. ") == "lisbon"
    assert exact_match("Lisbon.", "lisbon") and not exact_match("In Lisbon", "Lisbon")
    assert contains_answer("The city is Lisbon.", "Lisbon")
    assert not contains_answer("Oslo", "Lisbon")


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown synthetic task 'sum'"):
        make_item("sum", 0, 0)
    with pytest.raises(ConfigError, match="split='test'"):
        make_mix(2, split="test")
    with pytest.raises(ConfigError, match="n=-1"):
        make_mix(-1)

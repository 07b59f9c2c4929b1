"""Chat template -> token ids and the assistant-only loss mask, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from difflora_jax.data import (
    ChatEncoder,
    DataError,
    TokenizedExample,
    encode_chat,
    encode_chats,
    validate_messages,
)
from difflora_jax.errors import ConfigError

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris, of course."},
    ]
}


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_mask_is_assistant_content_plus_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    example = encode_chat(CONVERSATION, tok)
    text = tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert example.input_ids.dtype == np.int32
    assert example.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    found = spans(example.loss_mask)
    decoded = [tok.decode(example.input_ids[a:b]) for a, b in found]
    assert decoded == ["4<|im_end|>", "Paris, of course.<|im_end|>"]
    for a, b in found:
        # the template's assistant header right before is not learned, nor the newline after
        assert tok.decode(example.input_ids[a - 4 : a]) == "<|im_start|>assistant\n"
        assert tok.decode(example.input_ids[b : b + 1]) == "\n"
        assert example.input_ids[b - 1] == tok.convert_tokens_to_ids("<|im_end|>") == 2
    # 1 ("4") + 1 + 5 ("Paris, of course.") + 1 tokens
    assert int(example.loss_mask.sum()) == 8
    assert len(example) == 50
    unmasked = tok.decode(example.input_ids[example.loss_mask == 0])
    assert "Be brief." in unmasked and "What is 2 + 2?" in unmasked
    assert "Paris" not in unmasked


def test_template_default_system_prompt_is_not_learned(smollm2_tokenizer):
    tok = smollm2_tokenizer
    example = encode_chat(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey!"}]},
        tok,
    )
    text = tok.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.decode(example.input_ids[example.loss_mask == 1]) == "Hey!<|im_end|>"


def test_other_template_without_chatml(smollm2_tokenizer):
    """The mask is found by diffing rendered prefixes, not by knowing ChatML."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% endif %}{{ '\\n\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
    )
    example = encode_chat(CONVERSATION, tok)
    assert tok.decode(example.input_ids).startswith("### System:\nBe brief.\n\n### User:")
    decoded = [tok.decode(example.input_ids[a:b]) for a, b in spans(example.loss_mask)]
    assert decoded == ["4<|endoftext|>", "Paris, of course.<|endoftext|>"]


def test_end_of_turn_override(smollm2_tokenizer):
    example = ChatEncoder(smollm2_tokenizer, end_of_turn_ids=())(CONVERSATION)
    decoded = [
        smollm2_tokenizer.decode(example.input_ids[a:b]) for a, b in spans(example.loss_mask)
    ]
    # no known end token: the whole turn after the header, trailing newline included
    assert decoded == ["4<|im_end|>\n", "Paris, of course.<|im_end|>\n"]


def test_truncation_keeps_the_start(smollm2_tokenizer):
    full = encode_chat(CONVERSATION, smollm2_tokenizer)
    short = encode_chat(CONVERSATION, smollm2_tokenizer, max_length=40)
    assert len(short) == 40
    np.testing.assert_array_equal(short.input_ids, full.input_ids[:40])
    np.testing.assert_array_equal(short.loss_mask, full.loss_mask[:40])
    assert short.num_targets() == 2  # only the first answer ("4<|im_end|>") survives
    assert full.num_targets(40) == 2


def test_batch_equals_single(smollm2_tokenizer):
    other = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    batch = encode_chats([CONVERSATION, other, CONVERSATION], smollm2_tokenizer)
    for got, example in zip(batch, [CONVERSATION, other, CONVERSATION]):
        single = encode_chat(example, smollm2_tokenizer)
        np.testing.assert_array_equal(got.input_ids, single.input_ids)
        np.testing.assert_array_equal(got.loss_mask, single.loss_mask)


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"text": "hi"}, "no 'messages' field"),
        ({"messages": "hi"}, "'messages' must be a list"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 has role 'bot'"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
            "message 1 (assistant) content must be a string, got int",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": ["hello"]}, "message 0 must be a dict"),
        (["not", "a", "dict"], "an example must be a dict"),
    ],
)
def test_malformed_examples(smollm2_tokenizer, example, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_chat(example, smollm2_tokenizer)
    with pytest.raises(DataError, match=r"^row 7: "):
        validate_messages(example, "row 7")


def test_conversation_starting_with_assistant_is_rejected(smollm2_tokenizer):
    # SmolLM2's template inserts a system prompt before a non-system first message, so the
    # prefix before the assistant turn (nothing) is not a prefix of the conversation.
    bad = {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]}
    with pytest.raises(DataError, match="starts with an assistant turn"):
        encode_chat(bad, smollm2_tokenizer)


def test_template_that_rewrites_earlier_turns_is_rejected(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(omitted){% else %}"
        "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="renders assistant turn 2 differently"):
        encode_chat(CONVERSATION, tok)


def test_template_errors_become_data_errors(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="rejects this conversation: roles must alternate"):
        encode_chat(CONVERSATION, tok)


def test_config_errors(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        ChatEncoder(tok)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        ChatEncoder(None)
    with pytest.raises(ConfigError, match="max_length=1"):
        ChatEncoder(smollm2_tokenizer, max_length=1)


def test_tokenized_example_checks_lengths():
    with pytest.raises(DataError, match=r"input_ids \(3 tokens\) and loss_mask \(2\)"):
        TokenizedExample([1, 2, 3], [0, 1])


def test_token_merging_across_the_header_boundary(smollm2_tokenizer):
    """ "Assistant: " alone ends in a " " token; followed by the answer it becomes " Paris":
    the straddling token is the assistant's to learn."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    head = tok("User: x\nAssistant: ", add_special_tokens=False)["input_ids"]
    assert tok.decode(head[-1:]) == " "
    example = encode_chat(CONVERSATION, tok)
    decoded = [tok.decode(example.input_ids[a:b]) for a, b in spans(example.loss_mask)]
    # digits are split from the space before them, so "4" does not merge; " Paris" does
    assert decoded == ["4<|endoftext|>", " Paris, of course.<|endoftext|>"]

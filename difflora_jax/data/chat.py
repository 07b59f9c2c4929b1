"""Chat examples -> token ids with an assistant-only loss mask, through the tokenizer's template.

An example is Tulu-style: ``{"messages": [{"role": "system" | "user" | "assistant",
"content": str}, ...]}``. The conversation is rendered with the tokenizer's chat template (HF
``apply_chat_template``) and tokenized once. The mask is found without knowing the template's
format: for each assistant turn ``i`` the conversation prefix ``messages[:i]`` is rendered with
the generation prompt (ending in the assistant header) and ``messages[: i + 1]`` without it
(ending after the turn). Both texts must be prefixes of the whole conversation's text; their
token sequences must agree with the conversation's tokens up to at most
``MAX_BOUNDARY_TOKENS`` final tokens (a BPE merge across the boundary, e.g. ``"Assistant: "`` +
``"Paris"`` -> ``" Paris"``; such a straddling token counts as the assistant's). The turn is the
tokens between where the two prefixes stop matching the conversation. Within a turn the mask
covers the content and the end-of-turn token, i.e. everything up to and including the turn's
last special token (ChatML: ``<|im_end|>``), and not what the template writes after it
(ChatML: the newline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from difflora_jax.errors import ConfigError, DataError
from difflora_jax.protocols import Tokenizer

ROLES = ("system", "user", "assistant")
# Tokens at the end of a rendered prefix that may tokenize differently once the conversation
# goes on (BPE merging across the boundary, e.g. "Assistant: " + "Paris" -> ": " " Paris").
MAX_BOUNDARY_TOKENS = 3


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedExample:
    """One tokenized conversation.

    ``input_ids [length]`` int32 token ids; ``loss_mask [length]`` int32, 1 on tokens the model
    learns to produce (assistant content and end-of-turn tokens), 0 elsewhere.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        ids = np.asarray(self.input_ids, dtype=np.int32).reshape(-1)
        mask = np.asarray(self.loss_mask, dtype=np.int32).reshape(-1)
        if ids.shape != mask.shape:
            raise DataError(
                f"input_ids ({ids.shape[0]} tokens) and loss_mask ({mask.shape[0]}) differ in length"
            )
        object.__setattr__(self, "input_ids", ids)
        object.__setattr__(self, "loss_mask", mask)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def truncate(self, max_length: int) -> TokenizedExample:
        """The first ``max_length`` tokens (self when already short enough)."""
        if len(self) <= max_length:
            return self
        return TokenizedExample(self.input_ids[:max_length], self.loss_mask[:max_length])

    def num_targets(self, max_length: int | None = None) -> int:
        """Next-token targets with loss once truncated to ``max_length`` (the first token is
        never a target)."""
        mask = self.loss_mask if max_length is None else self.loss_mask[:max_length]
        return int(mask[1:].sum())


def validate_messages(example: Any, where: str = "example") -> list[dict[str, str]]:
    """The example's messages as plain ``{"role", "content"}`` dicts; raises ``DataError``.

    ``where`` (e.g. ``"train.jsonl:12"``) starts every error message.
    """
    if not isinstance(example, Mapping):
        raise DataError(f"{where}: an example must be a dict, got {type(example).__name__}")
    if "messages" not in example:
        raise DataError(f"{where}: example has no 'messages' field (keys: {sorted(example)})")
    messages = example["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise DataError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: message {i} must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; allowed: {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: message {i} ({role}) content must be a string, "
                f"got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant turn, so nothing to learn")
    return out


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (named ones and added tokens marked special)."""
    ids: set[int] = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in decoder.items() if getattr(token, "special", False))
    return frozenset(ids)


class ChatEncoder:
    """Encodes chat examples with one tokenizer; see the module docstring for the method.

    ``max_length`` truncates (keeping the start); ``end_of_turn_ids`` overrides which token ids
    may close an assistant turn (default: the tokenizer's special tokens).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        *,
        max_length: int | None = None,
        end_of_turn_ids: Iterable[int] | None = None,
    ):
        if tokenizer is None:
            raise ConfigError("a chat encoder needs a tokenizer; this checkpoint has none")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                "the tokenizer has no chat template, so chat examples cannot be encoded"
            )
        if max_length is not None and max_length < 2:
            raise ConfigError(f"max_length={max_length} is invalid: must be >= 2")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.end_of_turn_ids = (
            frozenset(int(i) for i in end_of_turn_ids)
            if end_of_turn_ids is not None
            else special_token_ids(tokenizer)
        )

    def __call__(self, example: Mapping[str, Any], where: str = "example") -> TokenizedExample:
        """Encode one example."""
        return self.encode_batch([example], wheres=[where])[0]

    def encode_batch(
        self, examples: Sequence[Mapping[str, Any]], wheres: Sequence[str] | None = None
    ) -> list[TokenizedExample]:
        """Encode several examples with one batched tokenizer call."""
        if wheres is None:
            wheres = [f"example {i}" for i in range(len(examples))]
        plans = []  # per example: (index of the whole text, [(head index, turn index)])
        texts: dict[str, int] = {}  # distinct texts to tokenize -> their index

        def text_index(text: str) -> int:
            return texts.setdefault(text, len(texts))

        for example, where in zip(examples, wheres):
            messages = validate_messages(example, where)
            full = self._render(messages, False, where)
            turns = []
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                if i == 0:
                    raise DataError(
                        f"{where}: the conversation starts with an assistant turn; it must "
                        "start with a system or user message"
                    )
                head = self._render(messages[:i], True, where)
                turn = (
                    full
                    if i == len(messages) - 1
                    else self._render(messages[: i + 1], False, where)
                )
                if not (turn.startswith(head) and full.startswith(turn)):
                    raise DataError(
                        f"{where}: the chat template renders assistant turn {i} differently "
                        "inside the whole conversation than after its prefix, so the turn's "
                        "tokens cannot be located (does the template rewrite or drop earlier "
                        "turns, e.g. their reasoning?)"
                    )
                turns.append((text_index(head), text_index(turn)))
            plans.append((text_index(full), turns))
        encoded = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [
            self._mask(encoded, full_index, turns, where)
            for (full_index, turns), where in zip(plans, wheres)
        ]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=generation_prompt, tokenize=False
            )
        except Exception as e:  # jinja2 errors raised by the template itself
            raise DataError(f"{where}: the chat template rejects this conversation: {e}") from e
        if not isinstance(text, str):
            raise DataError(f"{where}: the chat template rendered {type(text).__name__}, not text")
        return text

    def _mask(self, encoded, full_index, turns, where) -> TokenizedExample:
        ids = np.asarray(encoded[full_index], dtype=np.int32)
        mask = np.zeros_like(ids)
        for head_index, turn_index in turns:
            head, turn = encoded[head_index], encoded[turn_index]
            start, end = _common_prefix(head, ids), _common_prefix(turn, ids)
            if len(head) - start > MAX_BOUNDARY_TOKENS or len(turn) - end > MAX_BOUNDARY_TOKENS:
                raise DataError(
                    f"{where}: an assistant turn's tokens differ between its prefix tokenized "
                    "alone and the whole conversation by more than a token merging across the "
                    "turn boundary, so the turn cannot be located"
                )
            span = ids[start:end]
            ends = [j for j, token in enumerate(span.tolist()) if token in self.end_of_turn_ids]
            mask[start : start + (ends[-1] + 1 if ends else len(span))] = 1
        example = TokenizedExample(ids, mask)
        return example if self.max_length is None else example.truncate(self.max_length)


def _common_prefix(a: Sequence[int], b: np.ndarray) -> int:
    """Length of the longest common prefix of token sequences ``a`` and ``b``."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int32) != b[:n])
    return int(differ[0]) if differ.size else n


def encode_chat(
    example: Mapping[str, Any], tokenizer: Tokenizer, *, max_length: int | None = None
) -> TokenizedExample:
    """Token ids ``[length]`` and assistant-only loss mask ``[length]`` of one chat example."""
    return ChatEncoder(tokenizer, max_length=max_length)(example)


def encode_chats(
    examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, max_length: int | None = None
) -> list[TokenizedExample]:
    """``encode_chat`` over many examples, with batched tokenization."""
    return ChatEncoder(tokenizer, max_length=max_length).encode_batch(examples)

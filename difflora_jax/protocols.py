"""Structural types for the third-party objects the package is handed but does not define.

``Tokenizer`` is what the package calls on a Hugging Face tokenizer (``transformers``'
``PreTrainedTokenizerBase``, as ``load_model`` returns it); anything with these members works,
e.g. a small fake in a test. The model needs no protocol: every function that takes one takes
the package's own ``LlamaForCausalLM`` (an ``nnx.Module``, which ``nnx.split`` / ``nnx.state``
need anyway).

Members read with ``getattr(tokenizer, name, None)`` are optional and not part of the protocol:
``chat_template`` (None when the checkpoint ships no template), ``all_special_ids`` and
``added_tokens_decoder`` (see ``difflora_jax.data.chat.special_token_ids``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["Tokenizer"]


class Tokenizer(Protocol):
    """The Hugging Face tokenizer interface the package uses (a structural subset)."""

    @property
    def pad_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def __call__(
        self,
        text: str | list[str],
        /,
        *,
        add_special_tokens: bool = ...,
        return_offsets_mapping: bool = ...,
    ) -> Mapping[str, Any]:
        """``{"input_ids": ids}``: one id list for a string, one per string for a list; with
        ``return_offsets_mapping``, also each token's ``(start, end)`` characters (fast
        tokenizers)."""
        ...

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        /,
        *,
        add_generation_prompt: bool = ...,
        tokenize: bool = ...,
    ) -> Any:
        """The conversation rendered by the chat template: a ``str`` with ``tokenize=False``
        (the only way the package calls it; HF declares a union over all its options)."""
        ...

    def decode(
        self, token_ids: list[int], /, *, skip_special_tokens: bool = ...
    ) -> str | list[str]:
        """Text of ``token_ids`` (a ``str`` for one flat id list, as the package passes)."""
        ...

    def save_pretrained(self, save_directory: str, /) -> object:
        """Write the tokenizer files into ``save_directory``."""
        ...

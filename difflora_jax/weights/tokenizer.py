"""Tokenizers from a checkpoint: a HF directory's tokenizer files, or a GGUF file's metadata.

The GGUF path reads the metadata with the ``gguf`` package and builds a fast tokenizer with
transformers' converter, so it never imports PyTorch (transformers' own GGUF reader does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from difflora_jax.errors import CheckpointError
from difflora_jax.protocols import Tokenizer
from difflora_jax.weights.gguf_io import metadata

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _as_tokenizer(tokenizer: Any) -> Tokenizer:
    """A transformers tokenizer as the package's ``Tokenizer``. transformers 5 serves
    ``pad_token_id`` / ``eos_token_id`` through ``__getattr__``, which a type checker cannot
    see, so the protocol match is asserted here, at the one place tokenizers come from."""
    return cast(Tokenizer, tokenizer)


def tokenizer_from_directory(directory: Path) -> Tokenizer | None:
    """The tokenizer saved in a HF model directory, or None when it holds no tokenizer files."""
    if not any((directory / f).is_file() for f in _HF_TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {e}") from e
    return _as_tokenizer(tokenizer)


def tokenizer_from_gguf(reader, path: Path) -> Tokenizer:
    """A ``PreTrainedTokenizerFast`` with the chat template, built from GGUF metadata."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x; the 5.x that type checking sees lacks these names
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer  # pyright: ignore[reportAttributeAccessIssue]

    meta = metadata(reader)
    architecture = meta.get("general.architecture", "")
    groups = {
        group: {
            name: meta[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in meta
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise CheckpointError(f"{path}: GGUF metadata holds no tokenizer (tokenizer.ggml.tokens)")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for special, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            tokenizer_config[special] = tokens[int(token_id)]
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build a tokenizer from GGUF metadata: {e}") from e
    tokenizer_config.update(extra)
    return _as_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config))

"""Perplexity on held-out text: ``exp(total negative log-likelihood / total predicted
tokens)`` over documents, each read in windows of at most the model's positions (the first
token of a document is given, every later one predicted; a window starts at the last token of
the previous one, so each token is predicted once).

Documents: a text file (documents separated by blank lines), a JSONL with a ``text`` field,
or by default the held-out items of the offline instruction mix rendered as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from difflora_jax.data import make_mix
from difflora_jax.errors import DataError
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.protocols import Tokenizer


@nnx.jit
def _token_nll(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """-log p(ids[:, t + 1] | ids[:, :t + 1]) ``[1, length - 1]``."""
    logp = jax.nn.log_softmax(model(ids)[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def document_nll(
    model: LlamaForCausalLM, tokens: Sequence[int], window: int | None = None
) -> tuple[float, int]:
    """``(sum of -log p of tokens[1:], len(tokens) - 1)`` in windows of ``window`` tokens."""
    window = window or model.config.max_position_embeddings
    total, start = 0.0, 0
    while start < len(tokens) - 1:
        chunk = np.asarray([tokens[start : start + window]], np.int32)
        total += float(np.asarray(_token_nll(model, chunk)).sum())
        start += window - 1
    return total, max(len(tokens) - 1, 0)


def load_documents(path: str | Path | None, num: int = 20, seed: int = 0) -> list[str]:
    """Documents from a .txt / .jsonl file, or ``num`` held-out mix items as text."""
    if path is None:
        return [
            "\n".join(f"{m['role']}: {m['content']}" for m in item["messages"])
            for item in make_mix(num, seed=seed, split="eval")
        ]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"perplexity data not found: {path}")
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    docs.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{number}: not a {{text}} row: {e}") from e
        return docs
    return [d.strip() for d in path.read_text().split("\n\n") if d.strip()]


def evaluate_perplexity(
    model: LlamaForCausalLM, tokenizer: Tokenizer, documents: Sequence[str]
) -> list[dict[str, Any]]:
    """One record per document: its summed negative log-likelihood and predicted tokens."""
    eos = model.config.eos_token_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    first = int(bos) if bos is not None else (eos[0] if eos else 0)
    records = []
    for i, text in enumerate(documents):
        tokens = [first, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        nll, count = document_nll(model, tokens)
        records.append({"task": "perplexity", "length": 0, "seed": i, "nll": nll, "tokens": count})
    return records

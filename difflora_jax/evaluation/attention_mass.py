"""Attention mass per prompt segment (the paper's Fig. 4): how much of the query's attention
lands on the BOS token, the context before the needle, the needle, the context after it, and
the query itself, for the positive map and the lambda-scaled negative map separately.

For a needle-in-a-haystack item rendered with the chat template, ``nih_segments`` gives each
segment's token span: ``bos`` (the first token), ``before`` (everything up to the needle),
``needle``, ``after`` (up to the question) and ``query`` (the question to the end). The
attention of every query token, averaged over heads and query tokens, is summed over each
segment's keys (``share``: the shares of the positive map sum to 1 in each layer, those of the
negative map to lambda) and divided by the segment's length (``per_token``: the figure's
normalisation). Layers are averaged; ``per_layer`` keeps each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from difflora_jax.evaluation.nih import NIHItem
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.protocols import Tokenizer

SEGMENTS = ("bos", "before", "needle", "after", "query")


def nih_segments(
    tokenizer: Tokenizer, item: NIHItem
) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """``(token ids, {segment: (start, stop)})`` of ``item``'s chat prompt; the segments tile
    the sequence. The needle is the first one whose key is asked."""
    text = tokenizer.apply_chat_template(
        item.messages(), add_generation_prompt=True, tokenize=False
    )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    context_at = text.index(item.context)
    needle = next(n for n in item.needles if n.key in item.question)
    question_at = text.index(item.question, context_at + len(item.context))

    def token_at(char: int) -> int:
        """The first token ending after ``char``."""
        return next(i for i, (_, end) in enumerate(offsets) if end > char)

    start = token_at(context_at + needle.start)
    stop = token_at(context_at + needle.end - 1) + 1
    query = token_at(question_at)
    spans = {
        "bos": (0, 1),
        "before": (1, start),
        "needle": (start, stop),
        "after": (stop, query),
        "query": (query, len(ids)),
    }
    return ids, spans


def segment_mass(
    maps: Sequence[tuple[Any, Any | None]], spans: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    """Shares and per-token masses of ``maps`` (per layer ``(positive, negative or None)``,
    each ``[1, heads, queries, length]``) over ``spans``."""
    out: dict[str, Any] = {"per_layer": []}
    for positive, negative in maps:
        layer = {}
        for name, term in (("positive", positive), ("negative", negative)):
            if term is None:
                continue
            mean = np.asarray(term, np.float64)[0].mean(axis=(0, 1))  # [length]
            share = {s: float(mean[a:b].sum()) for s, (a, b) in spans.items()}
            layer[name] = {
                "share": share,
                "per_token": {s: share[s] / max(b - a, 1) for s, (a, b) in spans.items()},
            }
        out["per_layer"].append(layer)
    for name in ("positive", "negative"):
        layers = [layer[name] for layer in out["per_layer"] if name in layer]
        if layers:
            out[name] = {
                kind: {s: float(np.mean([lay[kind][s] for lay in layers])) for s in spans}
                for kind in ("share", "per_token")
            }
    return out


def attention_mass(model: LlamaForCausalLM, tokenizer: Tokenizer, item: NIHItem) -> dict[str, Any]:
    """The segment masses of ``model``'s attention from ``item``'s query tokens."""
    ids, spans = nih_segments(tokenizer, item)
    rows = jnp.arange(*spans["query"])
    maps = _maps(model, jnp.asarray([ids], jnp.int32), rows)
    return {"segments": spans, **segment_mass(maps, spans)}


@nnx.jit
def _maps(model: LlamaForCausalLM, ids: jax.Array, rows: jax.Array):
    return model.attention_maps(ids, query_rows=rows)

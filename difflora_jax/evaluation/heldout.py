"""Held-out evaluation on chat items with a gold answer (``{"messages", "answer", "task"}``).

- loss: the training loss (assistant tokens only, token-weighted mean) over the items;
- accuracy: greedy generation from the prompt (the messages before the assistant's answer);
  an item counts as correct when its normalised gold answer appears in the normalised output.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from flax import nnx

from difflora_jax.data import ChatEncoder, contains_answer, pack_examples, prompt_messages
from difflora_jax.generation import generate
from difflora_jax.losses import batch_loss
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.protocols import Tokenizer

_batch_loss = nnx.jit(batch_loss)


def heldout_loss(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    items: Sequence[dict[str, Any]],
    *,
    max_length: int = 512,
    batch_size: int = 8,
) -> float:
    """Token-weighted mean loss on the assistant tokens of ``items`` (no packing, no dropout)."""
    encoded = ChatEncoder(tokenizer, max_length=max_length).encode_batch(list(items))
    pad = tokenizer.pad_token_id or 0
    total, tokens = 0.0, 0.0
    for batch in pack_examples(encoded, batch_size, max_length, packing=False, pad_id=pad):
        loss, n = _batch_loss(model, batch)
        total += float(loss) * float(n)
        tokens += float(n)
    return total / max(tokens, 1.0)


def heldout_accuracy(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    items: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> dict[str, float]:
    """Answer accuracy overall (``"all"``) and per task, greedy decoding with the chat template."""
    correct: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        outputs = generate(
            model,
            tokenizer,
            [prompt_messages(item) for item in chunk],
            chat=True,
            max_new_tokens=max_new_tokens,
        )
        for item, out in zip(chunk, outputs):
            hit = contains_answer(out.text, item["answer"])
            correct["all"].append(hit)
            correct[item.get("task", "unknown")].append(hit)
    return {task: sum(hits) / len(hits) for task, hits in sorted(correct.items())}

"""Held-out evaluation: the loss equals a direct computation, accuracy counts contained answers."""

import numpy as np
from flax import nnx

from difflora_jax.data import ChatEncoder
from difflora_jax.evaluation import heldout_accuracy, heldout_loss


def test_heldout_loss_matches_a_direct_token_mean(tiny_model_and_tokenizer):
    model, tokenizer, items = tiny_model_and_tokenizer
    loss = heldout_loss(model, tokenizer, items, max_length=128, batch_size=2)
    # direct: per item, assistant-token cross entropy, token-weighted mean
    encoder = ChatEncoder(tokenizer, max_length=128)
    forward = nnx.jit(lambda m, ids: m(ids))
    total, count = 0.0, 0
    for item in items:
        ex = encoder(item)
        ids = np.asarray(ex.input_ids)[None]
        logits = np.asarray(forward(model, ids))[0].astype(np.float64)
        mask = np.asarray(ex.loss_mask)[1:].astype(bool)
        targets = ids[0, 1:]
        logp = (
            logits[:-1]
            - np.log(
                np.exp(logits[:-1] - logits[:-1].max(-1, keepdims=True)).sum(-1, keepdims=True)
            )
            - logits[:-1].max(-1, keepdims=True)
        )
        nll = -logp[np.arange(len(targets)), targets]
        total += nll[mask].sum()
        count += mask.sum()
    assert abs(loss - total / count) < 1e-4 * max(1.0, abs(loss))


def test_heldout_accuracy_reports_overall_and_per_task(tiny_model_and_tokenizer):
    model, tokenizer, items = tiny_model_and_tokenizer
    accuracy = heldout_accuracy(model, tokenizer, items, max_new_tokens=4, batch_size=4)
    assert set(accuracy) == {"all"} | {item["task"] for item in items}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())

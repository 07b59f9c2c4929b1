"""Evaluations: held-out loss and answer accuracy on chat items (the offline instruction mix);
needle-in-a-haystack (single, multi-key, multi-value; generated or RULER-style JSONL);
HumanEval pass@1 in a sandboxed subprocess; generation health (distinct-n, repeated n-grams).
``difflora eval`` runs them (``evaluation.suite``)."""

from difflora_jax.evaluation.heldout import heldout_accuracy, heldout_loss

__all__ = ["heldout_accuracy", "heldout_loss"]

"""Evaluations. Now: held-out loss and answer accuracy on chat items with gold answers (the
offline instruction mix). The paper's suite (needle-in-a-haystack, many-shot ICL, RAG QA,
HumanEval, attention mass) comes with the evaluation issue."""

from difflora_jax.evaluation.heldout import heldout_accuracy, heldout_loss

__all__ = ["heldout_accuracy", "heldout_loss"]

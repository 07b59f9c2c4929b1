"""The adapter variants the tests run through, in one table.

``DIFF_VARIANTS`` covers every DiffLoRA option and the combinations worth checking; the adapter
tests (tests/modeling/test_adapters.py) run all of it against the NumPy reference, the reference
format tests (tests/weights/test_reference_format.py) the part that format can express
(``REFERENCE_VARIANTS``). Each entry holds ``AdapterConfig`` fields on top of ``SMALL``.
"""

from __future__ import annotations

from difflora_jax.config import AdapterConfig

SMALL = dict(rank=4, alpha=8.0)  # s = 2

DIFF_VARIANTS = {
    "neg-adapters": dict(negative_term="adapters"),
    "neg-base-plus-adapters": dict(negative_term="base_plus_adapters"),
    "neg-full": dict(negative_term="full"),
    "negative-only": dict(positive_term=False, negative_term="adapters"),
    "negative-only-full": dict(positive_term=False, negative_term="full"),
    "negative-only-base-plus": dict(positive_term=False, negative_term="base_plus_adapters"),
    "fixed-lambda": dict(lambda_mode="fixed", lambda_init=0.1),
    "fixed-lambda-zero": dict(lambda_mode="fixed", lambda_init=0.0),
    "learned-lambda-configured-init": dict(lambda_init=0.3),
    "learned-lambda-init-zero-is-schedule": dict(lambda_init=0.0),
    "group-norm": dict(group_norm=True),
    "group-norm-fixed-lambda": dict(group_norm=True, lambda_mode="fixed", lambda_init=0.1),
    "relu": dict(relu_on_differential=True),
    "lora-v": dict(lora_v=True),
    "lora-o": dict(lora_o=True),
    "lora-mlp": dict(lora_mlp=True),
    "everything": dict(
        negative_term="full",
        group_norm=True,
        relu_on_differential=True,
        lora_v=True,
        lora_o=True,
        lora_mlp=True,
        dropout=0.1,
    ),
    "layers-1": dict(layers=(1,), lora_v=True, lora_o=True, lora_mlp=True),
    "identity-start": dict(identity_start=True),
    "rslora-dropout": dict(use_rslora=True, alpha=3.0, dropout=0.1),
    "gaussian-odd-alpha": dict(init="gaussian", alpha=3.5, seed=5),
}

# What the reference DiffLoRA format cannot hold (its own tests check the refusals): rsLoRA
# scaling, and our identity start (that code reads lambda_init = 0 as "use the schedule").
NOT_IN_REFERENCE_FORMAT = ("use_rslora", "identity_start")
REFERENCE_VARIANTS = {
    name: fields
    for name, fields in DIFF_VARIANTS.items()
    if not any(fields.get(option) for option in NOT_IN_REFERENCE_FORMAT)
}

LORA_VARIANTS = {
    "all-targets": dict(),
    "q-v": dict(targets=("q", "v")),
    "o-up-down": dict(targets=("o", "up", "down")),
    "k-gate": dict(targets=("k", "gate")),
    "rslora-dropout": dict(targets=("q", "v", "o", "gate", "down"), use_rslora=True, dropout=0.1),
    "layers-1": dict(layers=(1,), targets=("q", "k", "o", "down")),
}


def difflora(**fields) -> AdapterConfig:
    """A DiffLoRA ``AdapterConfig``: ``SMALL`` with ``fields``."""
    return AdapterConfig(method="difflora", **{**SMALL, **fields})


def lora(**fields) -> AdapterConfig:
    """A LoRA ``AdapterConfig``: ``SMALL`` with ``fields``."""
    return AdapterConfig(method="lora", **{**SMALL, **fields})

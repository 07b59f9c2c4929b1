# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Ablation: the negative term's form, and the rank
#
# The negative attention map's queries and keys can come from the adapters alone (the paper's
# DiffLoRA: Q2 = X A B), from the frozen projection plus adapters (Q2 = X W + X A B), or from
# full trainable projections (outside a parameter-efficient budget; not run here). And the
# paper compares rank 64 on the negative term alone with rank 32 on both terms. DiffLoRA
# adapts a tiny pretrained model to a retrieval task with decoys in the
# context (`difflora_jax.reproduce.toy`) in each form and at ranks 8, 32 and 64.

# %%
import dataclasses
import tempfile

import matplotlib.pyplot as plt

from difflora_jax.catalog import load_method
from difflora_jax.modeling.adapters import count_adapter_params
from difflora_jax.reproduce import toy

base = toy.load_base()
base_scores = toy.evaluate(base, toy.NOISY)
print("base model on the noisy task:", base_scores)

paper = load_method("difflora-32")
forms = {
    "adapters (paper)": paper,
    "base + adapters": dataclasses.replace(paper, negative_term="base_plus_adapters"),
}
ranks = {f"rank {r}": dataclasses.replace(paper, rank=r, alpha=2.0 * r) for r in (8, 32, 64)}
runs = {}
with tempfile.TemporaryDirectory() as tmp:
    for name, method in {**forms, **ranks}.items():
        if name == "rank 32":
            runs[name] = runs["adapters (paper)"]  # the same method: reuse the run
            continue
        runs[name] = toy.adapt(base, method, f"{tmp}/{len(runs)}")
rows = [{**toy.summary(name, run, base_scores), "trainable": count_adapter_params(run.model)}
        for name, run in runs.items()]
for row in rows:
    print(row)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for name in forms:
    ax1.plot(*toy.curve(runs[name]), label=name)
ax1.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log",
        title="negative-term form (rank 32)")
ax1.legend()
for name in ranks:
    ax2.plot(*toy.curve(runs[name]), label=name)
ax2.set(xlabel="step", yscale="log", title="rank (adapters-only negative term)")
ax2.legend()
plt.tight_layout()

# %% [markdown]
# **Conclusion.** The paper's form of the negative term (queries and keys from the adapters
# alone) learns the decoy task; built on the frozen projections (base + adapters), the negative
# map starts as a copy of the positive one and, in the same 150 steps, the accuracy stays near
# the base model's even though the training loss falls. Rank matters up to 32: rank 8 learns
# much less, and doubling to 64 adds little. The cell below checks these statements on the
# numbers above.

# %%
acc = {r["variant"]: r["accuracy"] for r in rows}
assert acc["adapters (paper)"] - acc["base + adapters"] > 0.2
assert acc["rank 8"] < acc["rank 32"] - 0.1
assert abs(acc["rank 64"] - acc["rank 32"]) < 0.05
print({name: round(a, 3) for name, a in acc.items()})

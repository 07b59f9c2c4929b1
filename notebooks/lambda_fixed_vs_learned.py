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
# # Ablation: fixed vs learned lambda
#
# DiffLoRA subtracts a lambda-scaled negative attention map. The paper learns lambda with the
# Differential Transformer's parametrisation (lambda = exp(q1.k1) - exp(q2.k2) + lambda_init)
# and reports that a *fixed* lambda of 0.1 is more stable. Here DiffLoRA-64 (negative term
# only, as in the paper) adapts a tiny pretrained model to a retrieval task with decoys in the
# context (`difflora_jax.reproduce.toy`), with lambda learned, fixed at 0.1, and fixed at 0.5.
# Same batches, same steps, same learning rate for every variant.

# %%
import dataclasses
import tempfile

import matplotlib.pyplot as plt

from difflora_jax.catalog import load_method
from difflora_jax.reproduce import toy

base = toy.load_base()
base_scores = toy.evaluate(base, toy.NOISY)
print("base model on the noisy task:", base_scores)

paper = load_method("difflora-64")
variants = {
    "learned (paper)": paper,
    "fixed 0.1 (paper)": dataclasses.replace(paper, lambda_mode="fixed", lambda_init=0.1),
    "fixed 0.5": dataclasses.replace(paper, lambda_mode="fixed", lambda_init=0.5),
}
runs = {}
with tempfile.TemporaryDirectory() as tmp:
    for name, method in variants.items():
        runs[name] = toy.adapt(base, method, f"{tmp}/{len(runs)}")
rows = [toy.summary(name, run, base_scores) for name, run in runs.items()]
for row in rows:
    print(row)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for name, run in runs.items():
    ax1.plot(*toy.curve(run), label=name)
    steps = [m["step"] for m in run.metrics]
    mean_lambda = [sum(m["lambda"].values()) / len(m["lambda"]) for m in run.metrics]
    ax2.plot(steps, mean_lambda, label=name)
ax1.set(xlabel="step", ylabel="training loss (answer token)", yscale="log", title="loss")
ax2.set(xlabel="step", ylabel="mean lambda over layers", title="lambda")
ax1.legend()
plt.tight_layout()

# %% [markdown]
# **Conclusion.** With the negative term alone (DiffLoRA-64, as in the paper), 150 steps
# barely move the accuracy on the decoy task for any lambda: every variant stays within a few
# points of the base model's 49% (DiffLoRA-32, with positive-term adapters too, reaches about
# 80% in `init_and_group_norm`). The learned lambda grows steadily, to several times its value
# after the first step, far above the paper's fixed 0.1; and the fixed 0.1 ends with the
# highest held-out loss: a small fixed lambda caps how much of the negative map can be
# subtracted. The paper prefers 0.1 for stability; at this scale it is the slowest to learn.
# The cell below checks each of these statements on the numbers above.

# %%
loss = {r["variant"]: r["loss"] for r in rows}
learned = runs["learned (paper)"].metrics
start, end = (sum(m["lambda"].values()) / len(m["lambda"]) for m in (learned[0], learned[-1]))
print(f"learned lambda (mean over layers): {start:.3f} after step 1 -> {end:.3f} at the end")
assert all(abs(r["accuracy"] - base_scores["accuracy"]) < 0.05 for r in rows)
assert end > 3 * start
assert max(loss, key=loss.get) == "fixed 0.1 (paper)"

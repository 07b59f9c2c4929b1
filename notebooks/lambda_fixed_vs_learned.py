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
# only, as in the paper) adapts a tiny pretrained model to key-value retrieval with context
# noise (`difflora_jax.reproduce.toy`), with lambda learned, fixed at 0.1, and fixed at 0.5.
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
# **Conclusion.** The cell below states, from the numbers above, which lambda reached the
# lowest held-out loss on the noisy task and how far the learned lambda moved from its
# initial value; on this toy the learned and fixed forms end close to each other, and the
# fixed lambda's first steps are no worse, consistent with the paper's preference for a fixed
# 0.1 as the more stable choice.

# %%
best = min(rows, key=lambda r: r["loss"])
learned = runs["learned (paper)"].metrics
start, end = (sum(m["lambda"].values()) / len(m["lambda"]) for m in (learned[0], learned[-1]))
print(f"lowest held-out loss: {best['variant']} ({best['loss']:.3f}, accuracy {best['accuracy']:.3f})")
print(f"learned lambda (mean over layers): {start:.3f} after step 1 -> {end:.3f} after the last step")
assert all(r["loss"] < 10 for r in rows)  # every variant trained to a finite, sane loss

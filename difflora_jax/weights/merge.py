"""Fold adapters into the base weights and write a plain Hugging Face Llama checkpoint.

Every LoRA adapter is a low-rank update of one projection, ``x W + s x A B = x (W + s A B)``,
so it folds exactly: the kernel becomes ``W + s * A B``. The same holds for DiffLoRA's
positive-term adapters (Q1 = X (W_Q + s A1 B1), likewise K1), ``lora_v`` and ``lora_mlp``.

What does not fold: the negative term. A DiffLoRA layer computes
``(softmax(Q1 K1^T) - lambda softmax(Q2 K2^T)) V``, two attention maps per head, and a Llama
layer has one, so a DiffLoRA layer folds only where it is exactly a Llama layer: lambda is
exactly 0 (a fixed lambda of 0, or learned vectors with exp(q1.k1) = exp(q2.k2) and no
lambda_init, as at our identity start), with no group norm (which rescales every head) and no
parallel output branch (``lora_o`` reads the attention input, which no Llama weight does). Any
other DiffLoRA layer is a CheckpointError that names the layer and points to the reference
format (``--format reference``), which the reference DiffLoRA code loads on the base model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from difflora_jax.errors import CheckpointError
from difflora_jax.modeling.adapters import is_differential
from difflora_jax.modeling.llama import LlamaForCausalLM, Projection
from difflora_jax.protocols import Tokenizer
from difflora_jax.weights.adapter_files import write_json
from difflora_jax.weights.hf_config import hf_llama_config
from difflora_jax.weights.layout import hf_layout
from difflora_jax.weights.safetensors_io import write_safetensors

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_COPIED_FILES = ("generation_config.json",)


def _unfoldable(model: LlamaForCausalLM) -> list[str]:
    """Why each differential layer cannot become a Llama layer (empty: all fold)."""
    problems = []
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        if not is_differential(attn):
            continue
        if isinstance(attn.lambda_init.get_value(), jax.ShapeDtypeStruct):
            # a model of shapes only (nnx.eval_shape): a fixed lambda is known from the config
            adapter = model.adapter_config
            if adapter is not None and adapter.lambda_mode == "fixed":
                lam = adapter.lambda_init_for(i)
            else:
                lam = 0.0
        else:
            lam = float(attn.lambda_value())
        if lam != 0.0:
            problems.append(
                f"layer {i}: lambda = {lam:.6g}, so the negative term "
                "lambda * softmax(Q2 K2^T) V is part of the function"
            )
        if attn.group_norm is not None:
            problems.append(f"layer {i}: the group norm (per-head RMS normalisation)")
        if attn.output_branch is not None:
            problems.append(f"layer {i}: the parallel output branch (lora_o), which reads X")
    return problems


def merged_params(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """Our base parameters (float32, by dotted path) with every foldable adapter folded in.

    CheckpointError when the model holds a DiffLoRA layer that a Llama layer cannot express.
    """
    problems = _unfoldable(model)
    if problems:
        raise CheckpointError(
            "these adapters cannot be merged into a Llama checkpoint: only LoRA adapters and "
            "DiffLoRA's positive-term adapters fold into base weights, and a Llama layer has "
            "one attention map per head, so it cannot hold DiffLoRA's negative term. Found: "
            + "; ".join(problems[:6])
            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            + ". Export with --format reference instead (the reference DiffLoRA code loads it "
            "on the base model), or keep the adapter checkpoint"
        )
    params = {
        ".".join(str(p) for p in path): np.asarray(variable.get_value(), np.float32)
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, Projection) or node.lora is None:
            continue
        name = ".".join(str(p) for p in path) + ".kernel"
        delta = np.asarray(node.lora.delta(), np.float64)
        params[name] = (params[name].astype(np.float64) + delta).astype(np.float32)
    return params


def write_merged(
    model: LlamaForCausalLM,
    directory: Path,
    *,
    params: dict[str, np.ndarray] | None = None,
    tokenizer: Tokenizer | None = None,
    base_directory: Path | None = None,
) -> dict[str, np.ndarray]:
    """Write the merged model into ``directory`` as a Hugging Face Llama checkpoint
    (``config.json``, float32 ``model.safetensors``, the tokenizer when given, and the base
    directory's ``generation_config.json`` when it has one); returns the tensors written.
    ``params``: ``merged_params(model)``, when already computed."""
    params = merged_params(model) if params is None else params
    config = hf_llama_config(model.config)
    layout = hf_layout(model.config)
    tensors = {entry.hf_name: entry.to_hf(params[path]) for path, entry in layout.items()}
    write_safetensors(directory / WEIGHTS_FILE, tensors)
    write_json(directory / CONFIG_FILE, config)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if base_directory is not None and base_directory.is_dir():
        for name in _COPIED_FILES:
            if (base_directory / name).is_file():
                shutil.copyfile(base_directory / name, directory / name)
    return tensors

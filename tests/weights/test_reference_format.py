"""The reference DiffLoRA format (the paper's PyTorch code, alexmsrh/difflora): export then import
is the identity on every tensor for every variant; the tensor names, shapes and config fields
are the documented ones; a reference-format directory built here by hand (torch tensors with
the documented names and ``(out, in)`` layout) imports and gives the logits of the independent
NumPy implementation of the spec; what the format cannot express, and bad input, fail clearly
with nothing written."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from difflora_jax.adapter_checkpoint import read_adapter_checkpoint, read_checkpoint_meta
from difflora_jax.config import AdapterConfig, from_dict
from difflora_jax.errors import CheckpointError
from difflora_jax.modeling.adapters import adapter_shapes
from difflora_jax.weights.export import export_adapter, import_adapter
from difflora_jax.weights.loading import load_model, read_model_config
from difflora_jax.weights.reference_format import (
    adapter_config_from_reference,
    read_reference,
    reference_config,
    write_reference,
)
from tests.modeling.reference_difflora import TrackedParams, reference_logits
from tests.tiny import TINY
from tests.variants import REFERENCE_VARIANTS, SMALL, difflora

from .conftest import IDS, MASK, REAL, adapted_checkpoint, adapter_values, logits

# The shapes of the tiny checkpoints (tests/tiny.py's TINY); R: the rank of tests/variants.py.
E, H, KV, D = TINY.hidden_size, TINY.num_heads, TINY.num_kv_heads, TINY.head_dim
M = TINY.intermediate_size
R = SMALL["rank"]


def canonical(adapter: AdapterConfig, num_layers: int = 2) -> AdapterConfig:
    """What the format keeps of an AdapterConfig: not the init or seed (they only choose a
    starting point), and lambda_init None and 0 mean the same schedule when learned."""
    learned = adapter.lambda_mode == "learned"
    layers = adapter.adapted_layers(num_layers)
    return dataclasses.replace(
        adapter,
        init="kaiming",
        seed=0,
        layers=None if layers == tuple(range(num_layers)) else layers,
        lambda_init=None if learned and not adapter.lambda_init else adapter.lambda_init,
    )


def _random_params(config, adapter, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in adapter_shapes(config, adapter).items()
    }


@pytest.mark.parametrize("variant", list(REFERENCE_VARIANTS))
def test_every_variant_round_trips_exactly(tmp_path, variant):
    adapter = difflora(**REFERENCE_VARIANTS[variant])
    params = _random_params(TINY, adapter)
    written = write_reference(tmp_path, TINY, adapter, params, "/models/base")
    assert set(load_file(tmp_path / "model.safetensors")) == set(written)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama_lora_diff_transformer"
    assert config["_name_or_path"] == "/models/base"

    imported, back = read_reference(tmp_path, TINY)
    assert imported == canonical(adapter)
    assert set(back) == set(params)
    for name, value in params.items():
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def _shapes_of(directory):
    return {k: v.shape for k, v in load_file(directory / "model.safetensors").items()}


def test_names_shapes_and_fields_are_the_documented_ones(tmp_path):
    """Base-plus-adapters negative term, learned lambda, group norm, V, O and MLP adapters."""
    adapter = difflora(group_norm=True, lora_v=True, lora_o=True, lora_mlp=True, dropout=0.05)
    write_reference(tmp_path, TINY, adapter, _random_params(TINY, adapter), None)
    expected = {}
    for i in range(2):
        a = f"model.layers.{i}.self_attn."
        expected.update(
            {
                a + "wq_lora_A1.weight": (R, E),
                a + "wq_lora_B1.weight": (H * D, R),
                a + "wk_lora_A1.weight": (R, E),
                a + "wk_lora_B1.weight": (KV * D, R),
                a + "wq_lora_A2.weight": (R, E),
                a + "wq_lora_B2.weight": (H * D, R),
                a + "wk_lora_A2.weight": (R, E),
                a + "wk_lora_B2.weight": (KV * D, R),
                a + "wv_lora_A.weight": (R, E),
                a + "wv_lora_B.weight": (KV * D, R),
                a + "wo_lora_A.weight": (R, E),
                a + "wo_lora_B.weight": (E, R),
                a + "lambda_q1": (D,),
                a + "lambda_k1": (D,),
                a + "lambda_q2": (D,),
                a + "lambda_k2": (D,),
                a + "subln.weight": (D,),
            }
        )
        m = f"model.layers.{i}.mlp."
        for proj in ("gate_proj", "up_proj"):
            expected[m + proj + "_lora_A.weight"] = (R, E)
            expected[m + proj + "_lora_B.weight"] = (M, R)
        expected[m + "down_proj_lora_A.weight"] = (R, M)
        expected[m + "down_proj_lora_B.weight"] = (E, R)
    assert _shapes_of(tmp_path) == expected

    config = json.loads((tmp_path / "config.json").read_text())
    assert {k: config[k] for k in FIELDS} == {
        "attention_lora_r": R,
        "attention_lora_alpha": 8,
        "attention_lora_dropout": 0.05,
        "learn_lambda": True,
        "diff_attn_lambda": 0.0,
        "lora_negative_term_only": False,
        "negative_term_lora_only": False,
        "negative_term_full_dim": False,
        "groupnorm": True,
        "lora_v": True,
        "lora_o": True,
        "lora_mlp": True,
        "relu_on_differential": False,
        "layers_to_transform": [0, 1],
        "diff_attn_init_with_base_weights": True,
    }
    # the base Llama config is there too
    assert read_model_config_dict(config) == {
        "hidden_size": E,
        "num_attention_heads": H,
        "num_key_value_heads": KV,
        "head_dim": D,
        "intermediate_size": M,
        "num_hidden_layers": 2,
        "vocab_size": 128,
    }


FIELDS = (
    "attention_lora_r",
    "attention_lora_alpha",
    "attention_lora_dropout",
    "learn_lambda",
    "diff_attn_lambda",
    "lora_negative_term_only",
    "negative_term_lora_only",
    "negative_term_full_dim",
    "groupnorm",
    "lora_v",
    "lora_o",
    "lora_mlp",
    "relu_on_differential",
    "layers_to_transform",
    "diff_attn_init_with_base_weights",
)


def read_model_config_dict(config):
    keys = (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "num_hidden_layers",
        "vocab_size",
    )
    return {k: config[k] for k in keys}


def test_full_negative_term_fixed_lambda_names_and_fields(tmp_path):
    adapter = difflora(
        positive_term=False, negative_term="full", lambda_mode="fixed", lambda_init=0.1, layers=(1,)
    )
    write_reference(tmp_path, TINY, adapter, _random_params(TINY, adapter), None)
    a = "model.layers.1.self_attn."
    assert _shapes_of(tmp_path) == {a + "wq_2.weight": (H * D, E), a + "wk_2.weight": (KV * D, E)}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["learn_lambda"] is False and config["diff_attn_lambda"] == 0.1
    assert config["lora_negative_term_only"] is True and config["negative_term_full_dim"] is True
    assert config["layers_to_transform"] == [1]


def test_checkpoint_export_import_is_the_identity(tiny_llama, tmp_path):
    """Through adapter checkpoints: checkpoint -> reference directory -> checkpoint."""
    directory, _ = tiny_llama()
    adapter = difflora(negative_term="adapters", group_norm=True, lora_o=True, lambda_init=0.2)
    model, checkpoint = adapted_checkpoint(directory, tmp_path / "ckpt", adapter)
    out = export_adapter(checkpoint, tmp_path / "reference", "reference")
    config = json.loads((out / "config.json").read_text())
    assert config["_name_or_path"] == str(directory.absolute())
    again = import_adapter(out, tmp_path / "again", "reference")  # base from _name_or_path

    first, second = read_adapter_checkpoint(checkpoint), read_adapter_checkpoint(again)
    assert second.adapter == canonical(adapter)
    assert set(second.params) == set(first.params)
    for name, value in first.params.items():
        np.testing.assert_array_equal(second.params[name], value, err_msg=name)
    meta = read_checkpoint_meta(again)
    assert (
        meta["base_model"]["fingerprint"]
        == read_checkpoint_meta(checkpoint)["base_model"]["fingerprint"]
    )
    # and it loads as any adapter checkpoint does, onto the base model it was checked against
    loaded, _ = load_model(directory, adapter=again, with_tokenizer=False)
    assert loaded.adapter_config == canonical(adapter)
    expected = adapter_values(model)
    for name, value in adapter_values(loaded).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# a reference-format directory built by hand, against the independent NumPy implementation

HAND_BUILT = {
    # (tiny checkpoint overrides, reference config fields, the AdapterConfig they mean)
    "learned-schedule-gn-v-o-mlp-layer-1": (
        dict(),
        dict(
            learn_lambda=True,
            diff_attn_lambda=0.0,
            groupnorm=True,
            lora_v=True,
            lora_o=True,
            lora_mlp=True,
            layers_to_transform=[1],
        ),
        difflora(group_norm=True, lora_v=True, lora_o=True, lora_mlp=True, layers=(1,)),
    ),
    "fixed-full-negative-only-relu-mha-tied": (
        dict(num_key_value_heads=4, tie_word_embeddings=True),
        dict(
            learn_lambda=False,
            diff_attn_lambda=0.1,
            negative_term_full_dim=True,
            lora_negative_term_only=True,
            relu_on_differential=True,
            groupnorm=False,
            layers_to_transform=[0, 1],
        ),
        difflora(
            positive_term=False,
            negative_term="full",
            lambda_mode="fixed",
            lambda_init=0.1,
            relu_on_differential=True,
        ),
    ),
    "learned-init-adapters-only": (
        dict(),
        dict(
            learn_lambda=True,
            diff_attn_lambda=0.3,
            negative_term_lora_only=True,
            groupnorm=False,
            lora_v=True,
            layers_to_transform=list(range(32)),  # the reference default; extra indices ignored
        ),
        difflora(negative_term="adapters", lambda_init=0.3, lora_v=True),
    ),
}


def _mlp_lora_tensors(prefix, linear):
    """The ``lora_mlp`` adapters of one layer (``prefix``: ``model.layers.{i}.mlp.``)."""
    tensors = {}
    for proj, (out_dim, in_dim) in (
        ("gate_proj", (M, E)),
        ("up_proj", (M, E)),
        ("down_proj", (E, M)),
    ):
        tensors[prefix + proj + "_lora_A.weight"] = linear(R, in_dim)
        tensors[prefix + proj + "_lora_B.weight"] = linear(out_dim, R, 0.5)
    return tensors


def _hand_built_tensors(fields, kv, seed):
    """Torch tensors named and shaped as the reference code's modules: nn.Linear weights
    ``(out, in)``, lambda vectors and the subln scale ``(head_dim,)``."""
    gen = torch.Generator().manual_seed(seed)

    def linear(out_dim, in_dim, scale=1.0):
        return scale * torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim)

    tensors = {}
    for i in fields["layers_to_transform"]:
        if i >= 2:
            continue
        a = f"model.layers.{i}.self_attn."
        if not fields.get("lora_negative_term_only"):
            tensors[a + "wq_lora_A1.weight"] = linear(R, E)
            tensors[a + "wq_lora_B1.weight"] = linear(H * D, R, 0.5)
            tensors[a + "wk_lora_A1.weight"] = linear(R, E)
            tensors[a + "wk_lora_B1.weight"] = linear(kv * D, R, 0.5)
        if fields.get("negative_term_full_dim"):
            tensors[a + "wq_2.weight"] = linear(H * D, E)
            tensors[a + "wk_2.weight"] = linear(kv * D, E)
        else:
            tensors[a + "wq_lora_A2.weight"] = linear(R, E)
            tensors[a + "wq_lora_B2.weight"] = linear(H * D, R, 0.5)
            tensors[a + "wk_lora_A2.weight"] = linear(R, E)
            tensors[a + "wk_lora_B2.weight"] = linear(kv * D, R, 0.5)
        if fields.get("lora_v"):
            tensors[a + "wv_lora_A.weight"] = linear(R, E)
            tensors[a + "wv_lora_B.weight"] = linear(kv * D, R, 0.5)
        if fields.get("lora_o"):
            tensors[a + "wo_lora_A.weight"] = linear(R, E)
            tensors[a + "wo_lora_B.weight"] = linear(E, R, 0.5)
        if fields["learn_lambda"]:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                tensors[a + name] = 0.15 * torch.randn(D, generator=gen)
        if fields.get("groupnorm"):
            tensors[a + "subln.weight"] = 1.0 + 0.3 * torch.randn(D, generator=gen)
        if fields.get("lora_mlp"):
            tensors.update(_mlp_lora_tensors(f"model.layers.{i}.mlp.", linear))
    return tensors


def _spec_params(tensors, kv):
    """The hand-built tensors in the NumPy reference's naming and layout, mapped here (not by
    difflora_jax): a ``[in, r]`` = A^T, b ``[r, *out]`` = B^T, full kernels ``[embed, *out]``."""
    renames = {
        "wq_lora_{}1": ("q_proj.lora", (H, D)),
        "wk_lora_{}1": ("k_proj.lora", (kv, D)),
        "wq_lora_{}2": ("negative_q", (H, D)),
        "wk_lora_{}2": ("negative_k", (kv, D)),
        "wv_lora_{}": ("v_proj.lora", (kv, D)),
        "wo_lora_{}": ("output_branch", (E,)),
    }
    params = {}
    for name, tensor in tensors.items():
        t = tensor.numpy().astype(np.float64)
        _, _, i, block, leaf = name.split(".", 4)
        ours = f"layers.{i}.{'attn' if block == 'self_attn' else 'mlp'}."
        if leaf.startswith("lambda_"):
            params[ours + leaf] = t
        elif leaf == "subln.weight":
            params[ours + "group_norm"] = t
        elif leaf in ("wq_2.weight", "wk_2.weight"):
            module, heads = ("negative_q", H) if leaf.startswith("wq") else ("negative_k", kv)
            params[ours + module + ".kernel"] = t.T.reshape(E, heads, D)
        elif block == "mlp":
            proj, matrix = leaf[: -len("_lora_A.weight")], leaf[-len("A.weight")]
            params[ours + f"{proj}.lora.{matrix.lower()}"] = t.T
        else:
            for pattern, (module, out_shape) in renames.items():
                for matrix in ("A", "B"):
                    if leaf == pattern.format(matrix) + ".weight":
                        value = t.T if matrix == "A" else t.T.reshape(R, *out_shape)
                        params[ours + f"{module}.{matrix.lower()}"] = value
    assert len(params) == len(tensors)
    return params


@pytest.mark.parametrize("case", list(HAND_BUILT))
def test_hand_built_reference_directory_matches_the_spec(tiny_llama, tmp_path, case):
    overrides, fields, expected = HAND_BUILT[case]
    directory, _ = tiny_llama(**overrides)
    kv = overrides.get("num_key_value_heads", KV)
    tensors = _hand_built_tensors(fields, kv, seed=len(case))
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    save_torch_file(tensors, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())  # transformers 5's own
    config.update(
        model_type="llama_lora_diff_transformer",
        architectures=["LlamaLoraDiffTransformerForCausalLM"],
        _name_or_path=str(directory),
        attention_lora_r=R,
        attention_lora_alpha=8,
        attention_lora_dropout=0.0,
        diff_attn_init_with_base_weights=True,
        **fields,
    )
    (ref_dir / "config.json").write_text(json.dumps(config))

    checkpoint = import_adapter(ref_dir, tmp_path / "checkpoint", "reference")
    meta = read_checkpoint_meta(checkpoint)
    assert from_dict(AdapterConfig, meta["adapter_config"]) == expected
    model, _ = load_model(directory, adapter=checkpoint, with_tokenizer=False)
    ours = logits(model)

    params = {
        ".".join(str(p) for p in path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    params.update(_spec_params(tensors, kv))
    tracked = TrackedParams(params)
    spec = reference_logits(tracked, model.config, expected, IDS, MASK)
    assert tracked.used == tracked.names()  # every hand-built tensor is part of the function
    base = reference_logits(params, model.config, None, IDS, MASK)
    assert np.abs(spec[REAL] - base[REAL]).max() > 1e-2
    diff = np.abs(ours[REAL] - spec[REAL]).max()
    assert diff <= 1e-4, f"max |ours - spec| = {diff:.3g}"


# ---------------------------------------------------------------------------------------------
# what the format cannot express, bad input


def _no_leftovers(parent, name):
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


def test_identity_start_cannot_be_exported(tiny_llama, tmp_path):
    directory, _ = tiny_llama()
    _, checkpoint = adapted_checkpoint(
        directory, tmp_path / "ckpt", difflora(identity_start=True), mirror_lambda=True
    )
    with pytest.raises(CheckpointError, match=r"identity_start.*diff_attn_lambda = 0.*schedule"):
        export_adapter(checkpoint, tmp_path / "out", "reference")
    assert _no_leftovers(tmp_path, "out")


def test_lora_has_no_reference_form(trained_lora, tmp_path):
    _, _, run_dir, _ = trained_lora
    with pytest.raises(CheckpointError, match=r"DiffLoRA adapters only.*--format peft"):
        export_adapter(run_dir, tmp_path / "out", "reference")
    assert _no_leftovers(tmp_path, "out")


def test_rslora_and_odd_head_sizes_have_no_reference_form():
    with pytest.raises(CheckpointError, match="rsLoRA"):
        reference_config(difflora(use_rslora=True), TINY, None)
    wide = dataclasses.replace(TINY, head_dim=32)  # 4 * 32 != 64
    with pytest.raises(CheckpointError, match="heads \\* head_dim"):
        reference_config(difflora(), wide, None)


@pytest.fixture
def reference_dir(tiny_llama, tmp_path):
    """A valid reference directory for the tiny GQA checkpoint, free to edit."""
    directory, _ = tiny_llama()
    adapter = difflora(lora_mlp=True)
    out = tmp_path / "reference"
    out.mkdir()
    write_reference(out, TINY, adapter, _random_params(TINY, adapter), str(directory))
    return out


WQ_A1 = "model.layers.0.self_attn.wq_lora_A1.weight"
LAMBDA = "model.layers.1.self_attn.lambda_k2"
EDITS = {
    "missing": (lambda t: t.pop(LAMBDA), rf"lacks 1 tensor.*{LAMBDA}"),
    "extra": (
        lambda t: t.update({"model.layers.0.self_attn.subln.weight": np.ones(D, np.float32)}),
        r"holds 1 tensor\(s\) not used by .*subln\.weight",
    ),
    "wrong-shape": (
        lambda t: t.update({WQ_A1: np.zeros((E, R), np.float32)}),
        rf"{WQ_A1}' has shape \(64, 4\), but .* needs \(4, 64\)",
    ),
    "integer": (lambda t: t.update({LAMBDA: np.zeros(D, np.int32)}), "not a float type"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_bad_tensors_fail_clearly_and_write_nothing(reference_dir, tmp_path, edit):
    change, message = EDITS[edit]
    path = reference_dir / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        import_adapter(reference_dir, tmp_path / "checkpoint", "reference")
    assert _no_leftovers(tmp_path, "checkpoint")


def test_another_base_model_fails_clearly(reference_dir, tiny_llama, tmp_path):
    mha, _ = tiny_llama(num_key_value_heads=4, tie_word_embeddings=True)
    with pytest.raises(
        CheckpointError, match=r"different base model.*num_kv_heads: 2 vs 4.*tie_word_embeddings"
    ):
        import_adapter(reference_dir, tmp_path / "checkpoint", "reference", model=mha)
    assert _no_leftovers(tmp_path, "checkpoint")


def test_missing_base_model_names_the_option(reference_dir, tmp_path):
    config = json.loads((reference_dir / "config.json").read_text())
    config["_name_or_path"] = ""
    (reference_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="--model"):
        import_adapter(reference_dir, tmp_path / "checkpoint", "reference")
    assert _no_leftovers(tmp_path, "checkpoint")


BASE = {"model_type": "llama_lora_diff_transformer", "layers_to_transform": [0, 1]}
BAD_CONFIGS = {
    "reinitialised-attention": (
        {"diff_attn_init_with_base_weights": False},
        "diff_attn_init_with_base_weights",
    ),
    "both-negative-flags": (
        {"negative_term_lora_only": True, "negative_term_full_dim": True},
        "both true",
    ),
    "per-layer-fixed-lambdas": (
        {"learn_lambda": False, "diff_attn_lambda": [0.1, 0.2]},
        "different fixed lambdas",
    ),
    "learned-lambda-list": ({"learn_lambda": True, "diff_attn_lambda": [0.1, 0.1]}, "one number"),
    "no-layer": ({"layers_to_transform": [5]}, "names none of the model's 2 layers"),
    "flag-type": ({"lora_v": "yes"}, "lora_v"),
    "not-reference": ({"model_type": "llama", "layers_to_transform": None}, "not a reference"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_inexpressible_reference_configs_fail_naming_the_field(case):
    change, message = BAD_CONFIGS[case]
    data = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=message):
        adapter_config_from_reference(data, num_layers=2)


def test_reference_defaults_and_per_layer_fixed_lambda():
    """Absent fields take that code's defaults (groupnorm on, dropout 0.1, r 32, alpha 64,
    fixed lambda 0); equal per-layer fixed lambdas are one constant."""
    adapter = adapter_config_from_reference({"model_type": "llama_lora_diff_transformer"}, 2)
    assert adapter == AdapterConfig(
        method="difflora",
        rank=32,
        alpha=64.0,
        dropout=0.1,
        group_norm=True,
        lambda_mode="fixed",
        lambda_init=0.0,
    )
    fixed = adapter_config_from_reference(
        {**BASE, "diff_attn_lambda": [0.2, 0.2], "layers_to_transform": [1]}, 2
    )
    assert fixed.lambda_init == 0.2 and fixed.layers == (1,)


def test_base_config_is_read_from_the_reference_config(tiny_llama, tmp_path):
    directory, _ = tiny_llama()
    adapter = difflora()
    write_reference(tmp_path, TINY, adapter, _random_params(TINY, adapter), None)
    config = read_model_config(directory)
    imported, _ = read_reference(tmp_path, config)
    assert imported == canonical(adapter)

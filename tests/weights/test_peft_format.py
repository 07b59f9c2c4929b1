"""PEFT format: a LoRA adapter trained here exports to PEFT, loads with ``peft`` on transformers'
model and gives our logits; a PEFT adapter made with ``peft`` imports and gives peft's logits;
bad input (missing, extra or misshapen tensors, another base model, what our LoRA cannot
express) ends in a clear error with nothing written."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

from difflora_jax.adapter_checkpoint import read_adapter_checkpoint, read_checkpoint_meta
from difflora_jax.config import AdapterConfig
from difflora_jax.errors import CheckpointError
from difflora_jax.modeling.adapters import adapter_shapes
from difflora_jax.weights.export import export_adapter, import_adapter
from difflora_jax.weights.loading import load_model, read_model_config
from difflora_jax.weights.peft_format import adapter_config_from_peft, peft_config, write_peft
from tests.conftest import torch_logits

from .conftest import ATOL, IDS, MASK, TRAINED_LORA, logits, max_diff

# peft 0.21 calls a transformers 5 API that warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

TORCH = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# (in, out) of each projection in the tiny GQA checkpoint (hidden 64, 4 heads, 2 kv heads of
# 16, intermediate 96)
DIMS = {
    "q": (64, 64),
    "k": (64, 32),
    "v": (64, 32),
    "o": (64, 64),
    "gate": (64, 96),
    "up": (64, 96),
    "down": (96, 64),
}


def _no_leftovers(parent, name):
    """Neither ``parent / name`` nor a staging directory for it exists."""
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


def test_trained_lora_exports_to_peft_and_matches_peft(trained_lora, tmp_path):
    directory, torch_base, run_dir, model = trained_lora
    out = export_adapter(run_dir, tmp_path / "peft", "peft")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, True)
    assert config["lora_dropout"] == 0.0 and config["layers_to_transform"] is None
    assert sorted(config["target_modules"]) == sorted(
        TORCH[t].split(".")[1] for t in TRAINED_LORA.targets
    )
    assert config["base_model_name_or_path"] == str(directory.absolute())

    tensors = load_file(out / "adapter_model.safetensors")
    expected = {}
    for i in range(2):
        for target in TRAINED_LORA.targets:
            module = f"base_model.model.model.layers.{i}.{TORCH[target]}"
            fan_in, fan_out = DIMS[target]
            expected[f"{module}.lora_A.weight"] = (4, fan_in)
            expected[f"{module}.lora_B.weight"] = (fan_out, 4)
    assert {k: v.shape for k, v in tensors.items()} == expected
    # torch layout: lora_A (r, in) is our a [*in, r] transposed, lora_B (out, r) our b [r, *out]
    o_proj = model.layers[1].attn.o_proj.lora
    np.testing.assert_array_equal(
        tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"],
        np.asarray(o_proj.a[...]).reshape(64, 4).T,
    )
    np.testing.assert_array_equal(
        tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"],
        np.asarray(o_proj.b[...]).T,
    )

    peft_model = PeftModel.from_pretrained(copy.deepcopy(torch_base), str(out)).eval()
    theirs = torch_logits(peft_model, IDS, MASK)
    base = torch_logits(torch_base, IDS, MASK)
    assert max_diff(theirs, base) > 100 * ATOL  # training moved the logits
    diff = max_diff(logits(model), theirs)
    assert diff <= ATOL, f"max |ours - peft| = {diff:.3g}"


PEFT_CASES = {
    # (tiny checkpoint overrides, LoraConfig fields)
    "layers-1-mha-tied": (
        dict(num_key_value_heads=4, tie_word_embeddings=True),
        dict(
            target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
        ),
    ),
    "all-linear-rslora-gqa": (
        dict(),
        dict(target_modules="all-linear", use_rslora=True, lora_dropout=0.1),
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_made_adapter_imports_and_matches(tiny_llama, tmp_path, case):
    overrides, lora_fields = PEFT_CASES[case]
    directory, torch_base = tiny_llama(**overrides)
    peft_model = get_peft_model(
        copy.deepcopy(torch_base), LoraConfig(r=4, lora_alpha=8, **lora_fields)
    ).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.peft_config["default"].base_model_name_or_path = str(directory)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    # the base model comes from base_model_name_or_path
    checkpoint = import_adapter(tmp_path / "peft", tmp_path / "checkpoint", "peft")
    meta = read_checkpoint_meta(checkpoint)
    assert meta["imported_from"]["format"] == "peft"
    assert meta["adapter_config"]["method"] == "lora"
    if "layers_to_transform" in lora_fields:
        assert meta["adapter_config"]["layers"] == [1]
        assert meta["adapter_config"]["targets"] == ["q", "v", "o", "up"]
    else:
        assert meta["adapter_config"]["use_rslora"] is True

    model, _ = load_model(directory, adapter=checkpoint, with_tokenizer=False)
    theirs = torch_logits(peft_model, IDS, MASK)
    assert max_diff(theirs, torch_logits(torch_base, IDS, MASK)) > 100 * ATOL
    diff = max_diff(logits(model), theirs)
    assert diff <= ATOL, f"max |ours - peft| = {diff:.3g}"

    # and back: our export of the imported checkpoint holds exactly peft's tensors
    again = export_adapter(checkpoint, tmp_path / "again", "peft")
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    exported = load_file(again / "adapter_model.safetensors")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    # and peft reads our config (layers_to_transform, rsLoRA, explicit target names) the same way
    reloaded = PeftModel.from_pretrained(copy.deepcopy(torch_base), str(again)).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, IDS, MASK), theirs)


# ---------------------------------------------------------------------------------------------
# bad input

SMALL_LORA = AdapterConfig(method="lora", rank=4, alpha=8.0, targets=("q", "v"))
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture
def peft_dir(tiny_llama, tmp_path):
    """A valid PEFT directory (rank 4 on q, v) for the tiny GQA checkpoint, free to edit."""
    directory, _ = tiny_llama()
    config = read_model_config(directory)
    rng = np.random.default_rng(0)
    params = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in adapter_shapes(config, SMALL_LORA).items()
    }
    (tmp_path / "peft").mkdir()
    write_peft(tmp_path / "peft", config, SMALL_LORA, params, str(directory))
    return tmp_path / "peft"


def _edit(peft_dir, edit):
    path = peft_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


EDITS = {
    "missing": (lambda t: t.pop(V_B), rf"lacks 1 tensor.*{V_B}"),
    "extra": (
        lambda t: t.update({Q_A.replace("q_proj", "k_proj"): t[Q_A]}),
        r"holds 1 tensor\(s\) not used by.*layers\.0\.self_attn\.k_proj\.lora_A",
    ),
    "wrong-shape": (
        lambda t: t.update({Q_A: np.zeros((5, 64), np.float32)}),
        rf"{Q_A}' has shape \(5, 64\), but .* needs \(4, 64\)",
    ),
    "nan": (
        lambda t: t.update({Q_A: np.full((4, 64), np.nan, np.float32)}),
        rf"{Q_A}' holds NaN",
    ),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_bad_tensors_fail_clearly_and_write_nothing(peft_dir, tmp_path, edit):
    change, message = EDITS[edit]
    _edit(peft_dir, change)
    with pytest.raises(CheckpointError, match=message):
        import_adapter(peft_dir, tmp_path / "checkpoint", "peft")
    assert _no_leftovers(tmp_path, "checkpoint")


def test_another_base_model_fails_clearly(peft_dir, tiny_llama, tmp_path):
    mha, _ = tiny_llama(num_key_value_heads=4, tie_word_embeddings=True)  # v_proj out 64, not 32
    with pytest.raises(
        CheckpointError, match=r"v_proj\.lora_B\.weight' has shape \(32, 4\).*\(64, 4\)"
    ):
        import_adapter(peft_dir, tmp_path / "checkpoint", "peft", model=mha)
    assert _no_leftovers(tmp_path, "checkpoint")


def test_existing_output_is_refused(peft_dir, tmp_path):
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        import_adapter(peft_dir, out, "peft")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


BASE_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj"],
}
BAD_CONFIGS = {
    "dora": ({"use_dora": True}, "use_dora"),
    "lm-head": ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    "uneven-layers": (
        {"target_modules": ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"]},
        "different projections in different layers",
    ),
    "bad-layer": ({"layers_to_transform": [2]}, "has 2"),
    "prefix-tuning": ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
    "pissa": ({"init_lora_weights": "pissa"}, "changes the base weights"),
    "rank-pattern": ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    "bias": ({"bias": "all"}, "bias"),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "classification": ({"task_type": "SEQ_CLS"}, "task_type"),
    "rank-zero": ({"r": 0}, "rank"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_inexpressible_peft_configs_fail_naming_the_field(case):
    change, field = BAD_CONFIGS[case]
    with pytest.raises(CheckpointError, match=field):
        adapter_config_from_peft({**BASE_CONFIG, **change}, num_layers=2)


def test_peft_config_fields_round_trip():
    adapter = AdapterConfig(
        method="lora",
        rank=8,
        alpha=16.0,
        dropout=0.05,
        use_rslora=True,
        init="gaussian",
        layers=(0, 2),
        targets=("k", "o", "down"),
    )
    config = peft_config(adapter, "some/base")
    assert config["layers_to_transform"] == [0, 2] and config["layers_pattern"] == "layers"
    assert config["init_lora_weights"] == "gaussian"
    assert adapter_config_from_peft(config, num_layers=3) == adapter
    # PEFT's other spellings: an int layers_to_transform, "all-linear", module paths, a regex
    spellings = [
        {"target_modules": "all-linear", "layers_to_transform": 1},
        {"target_modules": ["model.layers.1." + TORCH[t] for t in TORCH]},
        {"target_modules": r"model\.layers\.1\..*_proj"},
    ]
    for change in spellings:
        other = adapter_config_from_peft({**BASE_CONFIG, **change}, num_layers=2)
        assert other.layers == (1,) and other.targets == tuple(TORCH), change


def test_difflora_has_no_peft_form():
    with pytest.raises(CheckpointError, match="--format reference"):
        peft_config(AdapterConfig(method="difflora", rank=4, alpha=8.0), None)


def test_export_reads_only_the_checkpoint(trained_lora):
    """PEFT / reference export needs no base weights: the checkpoint alone."""
    _, _, run_dir, model = trained_lora
    checkpoint = read_adapter_checkpoint(run_dir)
    assert checkpoint.adapter == TRAINED_LORA
    assert checkpoint.model_config.num_layers == 2
    ours = {k: np.asarray(v) for k, v in checkpoint.params.items()}
    from .conftest import adapter_values

    expected = adapter_values(model)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)

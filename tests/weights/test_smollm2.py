"""The real embedded model: SmolLM2-135M-Instruct (GGUF Q4_1) against transformers on the
same file. transformers dequantizes with the same ``gguf`` package, so both sides hold the same
float32 weights; differences come only from the forward computation (and llama.cpp's Q/K
permutation, which both must undo identically)."""

import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from difflora_jax.generation import generate, generate_ids
from difflora_jax.weights.loading import load_model, resolve_source

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ALIAS = "smollm2-135m-instruct"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The capital of Germany is",
    "def fibonacci(n):\n    ",
    "Differential attention cancels noise by subtracting two softmax maps.",
]
CHAT_PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
]


@pytest.fixture(scope="module")
def ours():
    return load_model(ALIAS, dtype="float32")


@pytest.fixture(scope="module")
def reference():
    path = resolve_source(ALIAS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def test_config_read_from_gguf_metadata(ours):
    model, _ = ours
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 100000.0, True)
    n_params = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model)))
    assert n_params == 134_515_008 == c.num_params


def test_tokenizer_and_chat_template_match_transformers(ours, reference):
    _, tokenizer = ours
    _, ref_tokenizer = reference
    for text in PROMPTS + CHAT_PROMPTS:
        assert tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    ours_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ref_text = ref_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert ours_text == ref_text
    assert ours_text.startswith("<|im_start|>")


def test_logits_match_transformers_on_the_same_gguf(ours, reference):
    model, tokenizer = ours
    ref_model, _ = reference
    forward = nnx.jit(lambda m, ids: m(ids))
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]
        logits = np.asarray(forward(model, np.asarray([ids], np.int32)))[0]
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float().numpy()
        assert logits.shape == ref.shape
        assert np.abs(logits - ref).max() <= 1e-3, np.abs(logits - ref).max()


def test_greedy_generation_is_token_identical_to_transformers(ours, reference):
    model, tokenizer = ours
    ref_model, _ = reference
    ours_out = generate(model, tokenizer, CHAT_PROMPTS, chat=True, max_new_tokens=32)
    for prompt, out in zip(CHAT_PROMPTS, ours_out):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ref = ref_model.generate(
                ids, max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2
            )[0, ids.shape[1] :].tolist()
        assert out.token_ids == ref, (prompt, out.text)
    assert "Paris" in ours_out[0].text


def test_batched_left_padded_generation_equals_one_by_one(ours):
    model, tokenizer = ours
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    batched = generate_ids(model, prompts, max_new_tokens=12, eos_token_ids=[2], pad_token_id=2)
    for prompt, row in zip(prompts, batched):
        alone = generate_ids(model, [prompt], max_new_tokens=12, eos_token_ids=[2], pad_token_id=2)
        assert row == alone[0]


def test_bfloat16_load_answers_too(ours):
    model, tokenizer = load_model(ALIAS, dtype="bfloat16")
    assert (
        model.embed_tokens.embedding[...].dtype == np.dtype("bfloat16")
        or str(model.embed_tokens.embedding[...].dtype) == "bfloat16"
    )
    out = generate(model, tokenizer, CHAT_PROMPTS[0], chat=True, max_new_tokens=16)
    assert "Paris" in out[0].text


def test_library_never_imports_torch():
    code = (
        "import sys, difflora_jax\n"
        "from difflora_jax.generation import generate\n"
        "m, t = difflora_jax.load_model('smollm2-135m-instruct')\n"
        "print(generate(m, t, 'Hi', max_new_tokens=2)[0].finish_reason)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_identity_start_equals_the_real_base_model_then_moves(ours):
    """DiffLoRA with identity_start on SmolLM2: logits equal the base model's exactly at step 0
    and change after one optimizer step (lambda leaves 0)."""
    import dataclasses

    from difflora_jax.catalog import load_method
    from difflora_jax.modeling.adapters import apply_adapters, lambda_values, write_back
    from difflora_jax.training.config import OptimizerConfig
    from difflora_jax.training.optimizer import make_optimizer
    from difflora_jax.training.step import split_for_training, train_step

    base, tokenizer = ours
    ids = np.asarray([tokenizer(PROMPTS[0])["input_ids"][:16]], np.int32)
    forward = nnx.jit(lambda m, ids: m(ids))
    reference = np.asarray(forward(base, ids))
    adapter = dataclasses.replace(load_method("difflora-identity"), dropout=0.0)
    model = apply_adapters(nnx.clone(base), adapter)
    assert np.array_equal(np.asarray(forward(model, ids)), reference)
    assert np.all(np.asarray(lambda_values(model)) == 0.0)

    length = ids.shape[1] - 1
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((1, length), np.int32),
        "segment_ids": np.ones((1, length), np.int32),
        "positions": np.arange(length, dtype=np.int32)[None],
    }
    optimizer = OptimizerConfig(learning_rate=1e-2, total_steps=10, max_grad_norm=0.0)
    graphdef, params, rng, rest = split_for_training(model)
    opt_state = make_optimizer(optimizer).init(params)
    params, _, rng, metrics = train_step(
        graphdef, params, opt_state, rng, rest, batch, optimizer=optimizer
    )
    write_back(model, params, rng)
    assert bool(metrics["finite"])
    assert np.all(np.asarray(lambda_values(model)) != 0.0)
    moved = np.abs(np.asarray(forward(model, ids)) - reference).max()
    assert moved > 1e-4, moved

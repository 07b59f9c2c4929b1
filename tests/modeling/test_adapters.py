"""LoRA and DiffLoRA adapters against an independent NumPy reference of the spec.

The reference (``tests/modeling/reference_difflora.py``) recomputes the whole tiny Llama forward
in float64 from the formulas of the DiffLoRA paper (Misrahi et al., "DiffLoRA: Differential
Low-Rank Adapters for Large Language Models", arXiv:2507.23588; its method section on
differential attention with low-rank adapters on the positive and negative terms); it reads the
weights out of our model's parameters by name, never calls difflora_jax, and records which
parameters it read, so a trainable parameter the method does not call for also fails.

Every adapter parameter is randomised first: at initialisation B = 0 (and lambda = 0 with the
identity start) would hide most terms.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from difflora_jax.catalog import configs_dir, model_shape
from difflora_jax.config import AdapterConfig, ModelConfig, load_yaml
from difflora_jax.errors import ConfigError
from difflora_jax.modeling.adapters import AdapterParam, apply_adapters, count_adapter_params
from difflora_jax.modeling.llama import LayerConstant, LlamaForCausalLM
from tests.modeling.reference_difflora import TrackedParams, reference_logits
from tests.tiny import TINY, tiny_config
from tests.variants import DIFF_VARIANTS, LORA_VARIANTS, difflora, lora

ROOT = Path(__file__).resolve().parents[2]
# float32 against float64, relative to the largest |logit| (up to ~8 here): the tolerance is
# ATOL * max(1, max |reference|). Observed differences are <= 7.5e-6 absolute (~1e-6 relative).
ATOL = 1e-5

# The shapes of the tiny checkpoints (tests/tiny.py's TINY, also used by test_adapters_peft.py),
# so the op-by-op compilations of eager JAX are shared between the two files: multi-head
# attention with tied embeddings, and TINY itself (grouped-query, untied).
MODELS = {
    "mha": tiny_config(num_kv_heads=4, tie_word_embeddings=True),
    "gqa": TINY,
}

# Two rows: a full one and a left-padded one (pad id 0), so every case also checks padding.
IDS = np.array([[5, 17, 3, 42, 8, 29, 11], [0, 0, 0, 9, 103, 21, 127]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]], np.int32)
REAL = MASK.astype(bool)

OPTIONAL_TERMS = (
    "positive_term",
    "group_norm",
    "relu_on_differential",
    "lora_v",
    "lora_o",
    "lora_mlp",
)


# ---------------------------------------------------------------------------------------------
# helpers


def _variables(model, kind):
    """(dotted path, Variable) of every ``kind`` variable of the model, sorted by path."""
    found = [
        (".".join(str(k) for k in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, kind)
    ]
    return sorted(found, key=lambda item: item[0])


def _randomize_base(model, seed):
    """O(1) activations (unit-variance projections, norms far from ones), so that a 1e-5
    tolerance on the logits is meaningful."""
    rng = np.random.default_rng(seed)
    for name, var in _variables(model, nnx.Param):
        shape = var.shape
        if len(shape) == 1:
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        elif name.startswith("embed_tokens"):
            value = 0.25 * rng.standard_normal(shape)
        else:
            fan_in = shape[0] * shape[1] if "o_proj" in name else shape[0]
            value = rng.standard_normal(shape) / math.sqrt(fan_in)
        var.set_value(jnp.asarray(value, jnp.float32))


def randomize_adapters(model, seed=1):
    """Give every AdapterParam a random value, so that no term hides behind B = 0."""
    rng = np.random.default_rng(seed)
    for name, var in _variables(model, AdapterParam):
        shape = var.shape
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "a":  # [*in, rank]
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[:-1]))
        elif leaf == "b":  # [rank, *out]
            value = 0.5 * rng.standard_normal(shape) / math.sqrt(shape[0])
        elif leaf == "kernel":  # full-matrix negative term [embed, heads, head_dim]
            value = rng.standard_normal(shape) / math.sqrt(shape[0])
        elif leaf.startswith("lambda_"):
            # lambda = lambda_init + (exp(q1.k1) - 1) - (exp(q2.k2) - 1) stays near lambda_init
            # (positive, so the ReLU on the difference does bite) yet every vector matters.
            value = (0.15 if leaf[-1] == "1" else 0.05) * rng.standard_normal(shape)
        elif leaf == "group_norm":
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            raise AssertionError(f"unexpected adapter parameter {name}")
        var.set_value(jnp.asarray(value, jnp.float32))


def params_of(model) -> dict[str, np.ndarray]:
    """Every weight (base and adapter) by dotted name, as numpy."""
    return {
        name: np.asarray(var.get_value())
        for name, var in _variables(model, (nnx.Param, AdapterParam))
    }


def abstract_model(config: ModelConfig) -> LlamaForCausalLM:
    """A model whose base weights are shapes only (no random init to run)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def base_models():
    """One randomised base model per shape; tests adapt ``nnx.clone`` copies of it."""
    models = {}
    for seed, (name, config) in enumerate(MODELS.items()):
        model = abstract_model(config)
        _randomize_base(model, seed=10 + seed)  # sets every base weight
        models[name] = model
    return models


def adapted(base_models, shape, adapter, *, randomize=True):
    model = apply_adapters(nnx.clone(base_models[shape]), adapter)
    if randomize:
        randomize_adapters(model)
    return model


def logits(model, ids=IDS, mask=MASK):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def assert_matches_reference(model, adapter):
    params = TrackedParams(params_of(model))
    ref = reference_logits(params, model.config, adapter, IDS, MASK)
    ours = logits(model)
    assert ours.dtype == np.float32
    assert np.all(np.isfinite(ours))
    diff = np.abs(ours[REAL] - ref[REAL]).max()
    assert diff <= ATOL * max(1.0, np.abs(ref[REAL]).max()), f"max |ours - reference| = {diff:.3g}"
    unused = params.names() - params.used
    assert not unused, f"parameters the spec does not call for: {sorted(unused)}"
    return ours, ref


def _loss(model):
    """Next-token cross-entropy over real tokens."""
    out = model(jnp.asarray(IDS), jnp.asarray(MASK))
    targets = jnp.asarray(np.roll(IDS, -1, axis=1))
    logp = jax.nn.log_softmax(out, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weights = jnp.asarray(MASK, jnp.float32)
    return jnp.sum(nll * weights) / jnp.sum(weights)


def adapter_grads(model) -> dict[str, np.ndarray]:
    _, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, AdapterParam))(model)
    flat = nnx.to_flat_state(grads)
    return {".".join(str(k) for k in path): np.asarray(var.get_value()) for path, var in flat}


# ---------------------------------------------------------------------------------------------
# (a) every DiffLoRA variant equals the NumPy reference; (b) LoRA too


@pytest.mark.parametrize("shape", list(MODELS))
@pytest.mark.parametrize("variant", list(DIFF_VARIANTS))
def test_difflora_forward_matches_numpy_reference(base_models, shape, variant):
    adapter = difflora(**DIFF_VARIANTS[variant])
    model = adapted(base_models, shape, adapter)
    ours, ref = assert_matches_reference(model, adapter)
    # Not vacuous: the adapted model differs from the base model, and every optional term
    # switched on in this case changes the output (so agreement checks that term).
    base = logits(base_models[shape])
    assert np.abs(ours[REAL] - base[REAL]).max() > 1e-2
    params = params_of(model)
    for feature in OPTIONAL_TERMS:
        if getattr(adapter, feature):
            off = dataclasses.replace(adapter, **{feature: False})
            ablated = reference_logits(params, model.config, off, IDS, MASK)
            assert np.abs(ablated[REAL] - ref[REAL]).max() > 1e-3, feature


@pytest.mark.parametrize("shape", list(MODELS))
@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_lora_forward_matches_numpy_reference(base_models, shape, variant):
    adapter = lora(**LORA_VARIANTS[variant])
    model = adapted(base_models, shape, adapter)
    ours, _ = assert_matches_reference(model, adapter)
    base = logits(base_models[shape])
    assert np.abs(ours[REAL] - base[REAL]).max() > 1e-2


@pytest.mark.parametrize("shape", list(MODELS))
def test_difflora_with_the_jax_attention_backend_matches_numpy_reference(base_models, shape):
    """The stacked 2H-head call through jax.nn.dot_product_attention groups Q2 heads with K2."""
    adapter = difflora(negative_term="full", layers=(1,))
    model = adapted(base_models, shape, adapter)
    model.set_attention_backend("jax")
    assert_matches_reference(model, adapter)


@pytest.mark.parametrize("shape", list(MODELS))
def test_base_model_matches_numpy_reference(base_models, shape):
    """The reference itself on the plain model (no adapters)."""
    model = base_models[shape]
    assert_matches_reference(model, None)


def test_reference_sees_the_negative_term_and_lambda(base_models):
    """Sanity of the reference (so agreement above is not vacuous): lambda and the negative
    map change its output."""
    adapter = difflora()
    model = adapted(base_models, "gqa", adapter)
    params = params_of(model)
    ref = reference_logits(params, model.config, adapter, IDS, MASK)
    fixed = dataclasses.replace(adapter, lambda_mode="fixed", lambda_init=0.0)
    no_negative = reference_logits(params, model.config, fixed, IDS, MASK)
    assert np.abs(ref - no_negative)[REAL].max() > 1e-2


# ---------------------------------------------------------------------------------------------
# (c) gradients reach exactly the trainable set

# A fixed lambda of 0 multiplies the negative term by zero: by design no gradient reaches it.
LIVE_NEGATIVE_TERM = {
    name: kw
    for name, kw in DIFF_VARIANTS.items()
    if not (kw.get("lambda_mode") == "fixed" and kw.get("lambda_init") == 0.0)
}


@pytest.mark.parametrize(
    "adapter",
    [pytest.param(difflora(**kw), id=name) for name, kw in LIVE_NEGATIVE_TERM.items()]
    + [pytest.param(lora(**kw), id=f"lora-{name}") for name, kw in LORA_VARIANTS.items()],
)
def test_every_adapter_param_gets_a_gradient(base_models, adapter):
    model = adapted(base_models, "gqa", adapter)
    grads = adapter_grads(model)
    trainable = {name for name, _ in _variables(model, AdapterParam)}
    assert set(grads) == trainable
    for name, grad in grads.items():
        assert np.all(np.isfinite(grad)), name
        assert np.abs(grad).max() > 0, f"no gradient reaches {name}"


def _expected_trainable(config: ModelConfig, adapter: AdapterConfig) -> set[str]:
    """The trainable set the spec names, by parameter name."""
    layers = range(config.num_layers) if adapter.layers is None else adapter.layers
    names = set()
    for i in layers:
        at, mp = f"layers.{i}.attn.", f"layers.{i}.mlp."
        lowrank = []
        if adapter.method == "lora":
            for t in adapter.targets:
                owner = mp if t in ("gate", "up", "down") else at
                lowrank.append(f"{owner}{t}_proj.lora")
        else:
            if adapter.positive_term:
                lowrank += [at + "q_proj.lora", at + "k_proj.lora"]
            if adapter.negative_term == "full":
                names |= {at + "negative_q.kernel", at + "negative_k.kernel"}
            else:
                lowrank += [at + "negative_q", at + "negative_k"]
            if adapter.lambda_mode == "learned":
                names |= {at + f"lambda_{v}" for v in ("q1", "k1", "q2", "k2")}
            if adapter.group_norm:
                names.add(at + "group_norm")
            if adapter.lora_v:
                lowrank.append(at + "v_proj.lora")
            if adapter.lora_o:
                lowrank.append(at + "output_branch")
            if adapter.lora_mlp:
                lowrank += [mp + f"{t}_proj.lora" for t in ("gate", "up", "down")]
        names |= {f"{m}.{ab}" for m in lowrank for ab in ("a", "b")}
    return names


@pytest.mark.parametrize(
    "adapter",
    [pytest.param(difflora(**kw), id=name) for name, kw in DIFF_VARIANTS.items()]
    + [pytest.param(lora(**kw), id=f"lora-{name}") for name, kw in LORA_VARIANTS.items()],
)
def test_trainable_set_is_what_the_spec_names(base_models, adapter):
    model = adapted(base_models, "gqa", adapter, randomize=False)
    trainable = {name for name, _ in _variables(model, AdapterParam)}
    assert trainable == _expected_trainable(model.config, adapter)
    assert count_adapter_params(model) == sum(v.size for _, v in _variables(model, AdapterParam))


def test_param_filters_partition_the_state(base_models):
    """Param, AdapterParam, the dropout RNG state and the per-layer constants (lambda_init)
    split the model with no overlap and no remainder; frozen base weights are Param only, the
    trainable set AdapterParam only."""
    adapter = difflora(dropout=0.1, lora_v=True, lora_o=True, lora_mlp=True, group_norm=True)
    model = adapted(base_models, "gqa", adapter, randomize=False)
    assert not issubclass(AdapterParam, nnx.Param)
    _, params, adapters, rng_state, constants = nnx.split(
        model, nnx.Param, AdapterParam, nnx.RngState, LayerConstant
    )
    flat = {
        "param": nnx.to_flat_state(params),
        "adapter": nnx.to_flat_state(adapters),
        "rng": nnx.to_flat_state(rng_state),
        "constant": nnx.to_flat_state(constants),
    }
    assert all(
        isinstance(v, nnx.Param) and not isinstance(v, AdapterParam) for _, v in flat["param"]
    )
    assert all(isinstance(v, AdapterParam) for _, v in flat["adapter"])
    assert all(isinstance(v, nnx.RngState) for _, v in flat["rng"])
    paths = {key: {p for p, _ in items} for key, items in flat.items()}
    everything = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert {p[2:] for p in paths["constant"]} == {("attn", "lambda_init")}
    assert paths["param"] | paths["adapter"] | paths["rng"] | paths["constant"] == everything
    assert sum(len(p) for p in paths.values()) == len(everything)  # disjoint
    assert len(paths["rng"]) > 0  # dropout > 0 does carry RNG state
    # The filters used for training see exactly these sets.
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model, AdapterParam))} == paths["adapter"]
    assert not any(
        isinstance(v, AdapterParam) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )
    # The base weights are the base model's, untouched by apply_adapters.
    base = params_of(base_models["gqa"])
    for path, var in flat["param"]:
        name = ".".join(str(k) for k in path)
        np.testing.assert_array_equal(np.asarray(var.get_value()), base[name])


def test_identity_start_gradients_at_init(base_models):
    """Documented behaviour of the identity start at step 0 (lambda = 0 exactly): the lambda
    vectors and the positive-term B receive gradients; the negative-term adapters receive
    exactly none (lambda multiplies them) and the positive-term A none (B = 0)."""
    adapter = difflora(identity_start=True, negative_term="adapters")
    model = adapted(base_models, "gqa", adapter, randomize=False)
    grads = adapter_grads(model)
    for name, grad in grads.items():
        leaf = name.split(".attn.", 1)[1]
        if leaf.startswith("lambda_"):
            assert np.abs(grad).max() > 0, name
        elif leaf.startswith("negative_"):
            assert np.all(grad == 0), name
        elif leaf.endswith("lora.b"):
            assert np.abs(grad).max() > 0, name
        elif leaf.endswith("lora.a"):
            assert np.all(grad == 0), name
        else:
            raise AssertionError(f"unexpected trainable parameter {name}")


# ---------------------------------------------------------------------------------------------
# (d) initialisation


# Wide enough that every initialised adapter matrix has the >= 4096 samples the statistics below
# need (the base weights stay abstract, so the width costs nothing).
INIT_MODEL = tiny_config(
    vocab_size=16,
    hidden_size=256,
    intermediate_size=128,
    head_dim=64,
    max_position_embeddings=32,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def init_base():
    # apply_adapters only reads the base projections' shapes: the base weights stay abstract.
    return abstract_model(INIT_MODEL)


def assert_kaiming_uniform(x, bound, name=""):
    """U(-bound, bound): within the bound, reaching close to it, std bound / sqrt(3)."""
    x = np.asarray(x, np.float64)
    assert x.size >= 4096, name  # enough samples for the statistics below
    assert np.abs(x).max() <= bound, name
    assert np.abs(x).max() >= 0.99 * bound, name
    np.testing.assert_allclose(x.std(), bound / math.sqrt(3), rtol=0.03, err_msg=name)
    assert abs(x.mean()) < 0.05 * bound, name


def _init_values(model, needle):
    return {
        name: np.asarray(v.get_value())
        for name, v in _variables(model, AdapterParam)
        if needle in name
    }


def test_difflora_init_adapters_negative_term(init_base):
    """A kaiming-uniform bound 1/sqrt(d_in), B zero; with the adapters-only negative term B2
    kaiming-uniform with bound 1/sqrt(rank); lambda vectors N(0, 0.1); group norm ones."""
    r = 64
    adapter = AdapterConfig(
        rank=r,
        alpha=128.0,
        negative_term="adapters",
        group_norm=True,
        lora_v=True,
        lora_o=True,
        lora_mlp=True,
    )
    model = apply_adapters(nnx.clone(init_base), adapter)
    e, m = INIT_MODEL.hidden_size, INIT_MODEL.intermediate_size
    values = _init_values(model, "")
    lambdas = []
    for name, x in values.items():
        leaf = name.split(".", 3)[3]
        if leaf.endswith(".a"):
            fan_in = m if "down_proj" in leaf else e
            assert_kaiming_uniform(x, 1 / math.sqrt(fan_in), name)
        elif leaf.startswith("negative_") and leaf.endswith(".b"):
            assert_kaiming_uniform(x, 1 / math.sqrt(r), name)
        elif leaf.endswith(".b"):
            assert np.all(x == 0), name
        elif leaf.startswith("lambda_"):
            assert x.shape == (INIT_MODEL.head_dim,)
            lambdas.append(x)
        elif leaf == "group_norm":
            np.testing.assert_array_equal(x, np.ones(INIT_MODEL.head_dim), err_msg=name)
        else:
            raise AssertionError(f"unexpected adapter parameter {name}")
        assert x.dtype == np.float32, name
    lambdas = np.concatenate(lambdas)
    assert lambdas.size == 4 * INIT_MODEL.num_layers * INIT_MODEL.head_dim
    np.testing.assert_allclose(lambdas.std(), 0.1, rtol=0.15)
    assert abs(lambdas.mean()) < 0.02
    # The eight lambda vectors are distinct draws.
    assert len({v.tobytes() for n, v in values.items() if "lambda_" in n}) == 8
    # Two layers do not share adapter draws.
    assert not np.array_equal(
        values["layers.0.attn.negative_q.a"], values["layers.1.attn.negative_q.a"]
    )


def test_difflora_init_base_plus_adapters_and_full(init_base):
    plus = apply_adapters(
        nnx.clone(init_base), AdapterConfig(rank=64, negative_term="base_plus_adapters")
    )
    for name, x in _init_values(plus, "negative_").items():
        if name.endswith(".b"):
            assert np.all(x == 0), name
        else:
            assert_kaiming_uniform(x, 1 / math.sqrt(INIT_MODEL.hidden_size), name)
    full = apply_adapters(nnx.clone(init_base), AdapterConfig(rank=64, negative_term="full"))
    kernels = _init_values(full, "negative_")
    assert set(kernels) == {
        f"layers.{i}.attn.negative_{qk}.kernel" for i in range(2) for qk in ("q", "k")
    }
    for name, x in kernels.items():
        heads = INIT_MODEL.num_heads if "negative_q" in name else INIT_MODEL.num_kv_heads
        assert x.shape == (INIT_MODEL.hidden_size, heads, INIT_MODEL.head_dim)
        assert_kaiming_uniform(x, 1 / math.sqrt(INIT_MODEL.hidden_size), name)


def test_gaussian_init_std_is_one_over_rank(init_base):
    r = 16
    model = apply_adapters(
        nnx.clone(init_base), AdapterConfig(method="lora", rank=r, init="gaussian")
    )
    for name, x in _init_values(model, "").items():
        if name.endswith(".a"):
            np.testing.assert_allclose(x.std(), 1 / r, rtol=0.03, err_msg=name)
            assert abs(x.mean()) < 0.05 / r
        else:
            assert np.all(x == 0), name


def test_lora_init_fan_in_of_every_target(init_base):
    """d_in is the whole input of the projection: heads x head_dim for o, intermediate for
    down (our kernels contract several axes)."""
    model = apply_adapters(nnx.clone(init_base), AdapterConfig(method="lora", rank=64))
    c = INIT_MODEL
    fan_in = dict(
        q=c.hidden_size,
        k=c.hidden_size,
        v=c.hidden_size,
        o=c.num_heads * c.head_dim,
        gate=c.hidden_size,
        up=c.hidden_size,
        down=c.intermediate_size,
    )
    values = _init_values(model, "layers.0.")
    assert len(values) == 14
    for target, d_in in fan_in.items():
        owner = "mlp" if target in ("gate", "up", "down") else "attn"
        a = values[f"layers.0.{owner}.{target}_proj.lora.a"]
        b = values[f"layers.0.{owner}.{target}_proj.lora.b"]
        assert a.shape[-1] == b.shape[0] == 64
        assert math.prod(a.shape[:-1]) == d_in
        assert_kaiming_uniform(a, 1 / math.sqrt(d_in), target)
        assert np.all(b == 0), target


def test_identity_start_lambda_vectors_are_mirrored(init_base):
    model = apply_adapters(nnx.clone(init_base), AdapterConfig(identity_start=True))
    for layer in model.layers:
        attn = layer.attn
        np.testing.assert_array_equal(attn.lambda_q1[...], attn.lambda_q2[...])
        np.testing.assert_array_equal(attn.lambda_k1[...], attn.lambda_k2[...])
        assert np.abs(np.asarray(attn.lambda_q1[...])).max() > 0
        assert float(attn.lambda_value()) == 0.0


# ---------------------------------------------------------------------------------------------
# (e) trainable-parameter counts on Llama-3.2-1B shapes (the paper's / reference code's)

METHODS = configs_dir() / "methods"
QUICKSTART = AdapterConfig(
    rank=32,
    alpha=64.0,
    positive_term=True,
    negative_term="base_plus_adapters",
    lambda_mode="fixed",
    lambda_init=0.1,
    group_norm=True,
)
# (total, per layer) from the paper / reference code, independent of our code.
PAPER_COUNTS = {
    "lora-r8.yaml": (5_636_096, 352_256),
    "difflora-64.yaml": (6_819_840, 426_240),
    "difflora-64-fixed-lambda.yaml": (16 * (426_240 - 256), 426_240 - 256),  # no lambda vectors
    "difflora-32.yaml": (6_819_840, 426_240),
    "difflora-32-gn.yaml": (6_820_864, 426_304),
    "difflora-identity.yaml": (6_819_840, 426_240),  # the shapes of DiffLoRA-32
    "quickstart": (6_816_768, 426_048),
}


@pytest.fixture(scope="module")
def llama_1b():
    return abstract_model(model_shape("llama-3.2-1b"))


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_trainable_counts_on_llama_3_2_1b(llama_1b, name):
    config = model_shape("llama-3.2-1b")
    adapter = QUICKSTART if name == "quickstart" else load_yaml(AdapterConfig, METHODS / name)
    if name == "quickstart":  # the whole construction abstract, as a user would count
        abstract = nnx.eval_shape(
            lambda: apply_adapters(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), adapter)
        )
    else:  # the same, sharing one abstract base model
        abstract = nnx.eval_shape(lambda m: apply_adapters(m, adapter), nnx.clone(llama_1b))
    total, per_layer = PAPER_COUNTS[name]
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, AdapterParam)))
    assert counted == total
    assert count_adapter_params(abstract) == total
    layer0 = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.layers[0], AdapterParam)))
    assert layer0 == per_layer
    assert total == config.num_layers * per_layer


# ---------------------------------------------------------------------------------------------
# (f) identity start


@pytest.mark.parametrize("negative_term", ["adapters", "base_plus_adapters", "full"])
def test_identity_start_preserves_the_base_model_then_moves(base_models, negative_term):
    adapter = difflora(identity_start=True, negative_term=negative_term, lora_v=True, lora_o=True)
    model = adapted(base_models, "gqa", adapter, randomize=False)
    base = logits(base_models["gqa"])
    start = logits(model)
    # Bitwise: B = 0 gives XW + 0 exactly, lambda = 0 exactly, and 0 * (negative map) is 0.
    assert np.abs(start[REAL] - base[REAL]).max() == 0.0

    frozen = params_of(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=AdapterParam)
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, AdapterParam))(model)
    optimizer.update(model, grads)
    after = logits(model)
    assert np.abs(after[REAL] - base[REAL]).max() > 1e-3
    # lambda has left 0, and only adapter parameters moved.
    assert all(float(layer.attn.lambda_value()) != 0.0 for layer in model.layers)
    moved = params_of(model)
    for name, _ in _variables(model, nnx.Param):
        np.testing.assert_array_equal(moved[name], frozen[name], err_msg=name)
    # Now the negative term receives gradients too (with B2 = 0, base-plus-adapters' A2 waits
    # one more step for B2 to move, as any LoRA A).
    for name, grad in adapter_grads(model).items():
        if ".negative_" in name:
            if negative_term == "base_plus_adapters" and name.endswith(".a"):
                assert np.all(grad == 0), name
            else:
                assert np.abs(grad).max() > 0, name


# ---------------------------------------------------------------------------------------------
# (g) KV-cache decoding


@pytest.mark.parametrize(
    "adapter",
    [
        pytest.param(difflora(relu_on_differential=True), id="relu"),
        pytest.param(
            difflora(
                negative_term="full",
                group_norm=True,
                lora_v=True,
                lora_o=True,
                lora_mlp=True,
                layers=(1,),
            ),
            id="full-gn-extras-layers-1",
        ),
    ],
)
def test_cached_decoding_equals_full_recomputation(base_models, adapter):
    """Prefill the first four columns of the left-padded batch through the cache, then feed
    the remaining three tokens one at a time; every step's logits equal one full forward pass
    over the whole sequences (and that pass equals the NumPy reference)."""
    model = adapted(base_models, "gqa", adapter)
    full = logits(model)
    prompt = 4
    cache = model.init_cache(2, IDS.shape[1])
    kv = model.config.num_kv_heads
    for i in range(model.config.num_layers):  # an adapted layer caches K1 and K2
        keys, _ = cache.layer(i)
        differential = adapter.layers is None or i in adapter.layers
        assert keys.shape[2] == (2 * kv if differential else kv)
    positions = np.maximum(np.cumsum(MASK, 1) - 1, 0).astype(np.int32)
    step = nnx.jit(
        lambda m, ids, mask, positions, cache: m.forward(
            ids, mask, positions=positions, cache=cache
        )
    )
    out, cache = step(
        model,
        jnp.asarray(IDS[:, :prompt]),
        jnp.asarray(MASK[:, :prompt]),
        jnp.asarray(positions[:, :prompt]),
        cache,
    )
    real = REAL[:, :prompt]
    np.testing.assert_allclose(np.asarray(out)[real], full[:, :prompt][real], atol=2e-5, rtol=0)
    for t in range(prompt, IDS.shape[1]):
        out, cache = step(
            model,
            jnp.asarray(IDS[:, t : t + 1]),
            jnp.asarray(MASK[:, t : t + 1]),
            jnp.asarray(positions[:, t : t + 1]),
            cache,
        )
        np.testing.assert_allclose(np.asarray(out)[:, 0], full[:, t], atol=2e-5, rtol=0)
    ref = reference_logits(params_of(model), model.config, adapter, IDS, MASK)
    assert np.abs(full[REAL] - ref[REAL]).max() <= ATOL * max(1.0, np.abs(ref[REAL]).max())


# ---------------------------------------------------------------------------------------------
# (h) validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(method="prefix"), "method"),
        (dict(negative_term="dense"), "negative_term"),
        (dict(lambda_mode="fixed"), "lambda_init"),
        (dict(lambda_mode="annealed"), "lambda_mode"),
        (dict(identity_start=True, group_norm=True), "group_norm"),
        (dict(identity_start=True, relu_on_differential=True), "relu_on_differential"),
        (dict(identity_start=True, lambda_init=0.5), "lambda_init"),
        (dict(identity_start=True, lambda_mode="fixed", lambda_init=0.0), "lambda_mode"),
        (dict(init="orthogonal"), "init"),
        (dict(rank=0), "rank"),
        (dict(targets=("q", "qkv")), "targets"),
        (dict(layers=()), "layers"),
    ],
)
def test_adapter_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        AdapterConfig(**kwargs).validate()


def test_layers_out_of_range_is_rejected_by_apply_adapters(base_models):
    model = nnx.clone(base_models["gqa"])
    with pytest.raises(ConfigError, match=r"'layers'.*num_layers \(2\)"):
        apply_adapters(model, difflora(layers=(0, 2)))
    assert model.adapter_config is None
    assert not _variables(model, AdapterParam)


def test_adapters_cannot_be_applied_twice(base_models):
    model = apply_adapters(nnx.clone(base_models["gqa"]), difflora())
    with pytest.raises(ValueError, match="already carries adapters"):
        apply_adapters(model, lora())


def test_bad_yaml_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: difflora\nnegative_term: left_only\n")
    with pytest.raises(ConfigError, match="'negative_term'"):
        load_yaml(AdapterConfig, path)
    path.write_text("method: difflora\nlamda_init: 0.1\n")
    with pytest.raises(ConfigError, match="lamda_init"):
        load_yaml(AdapterConfig, path)

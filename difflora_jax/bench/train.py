"""``difflora bench train``: train-step speed, compile time and model FLOP utilisation.

One *train step* = forward, loss, backward to the adapters, gradient clipping and AdamW over
the adapters, on one batch of random token ids (fixed seed, identical for every
implementation; loss on every next token; no padding). Ours is ``training.step.train_step``,
the jitted step the training loop runs, for each method (dropout as in its YAML), with the
adapters in the loop's stacked layout (``--also-per-layer`` times them stored per layer as
well: the same numbers, a larger program to compile). With
``--peers`` (CPU), the same step in PyTorch (float32, eager): ``peft`` LoRA for LoRA methods,
the eager DiffLoRA attention of ``bench.peers`` for DiffLoRA methods, on the same weights.

Each runner is called once (JAX: tracing and compilation included; reported as ``first call
s``, and ``compile s`` = first call minus the median step: what the first call costs beyond a
step), then
``repeats`` timed rounds run the runners interleaved (so bursts of outside load hit all of
them); the median step is kept. ``tokens/s = B*T / step``. ``MFU`` = the step's model FLOPs
(``modeling.flops``) per second over the matmul FLOP/s measured on the same device in the same
run. Ratios divide our tokens/s by the peer's at the same shape and method.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from difflora_jax.bench import peers
from difflora_jax.bench.report import (
    compilation_cache,
    cpu_times,
    header,
    load_average,
    machine_info,
)
from difflora_jax.catalog import load_method, model_names, model_shape
from difflora_jax.config import AdapterConfig
from difflora_jax.modeling.adapters import apply_adapters, count_adapter_params
from difflora_jax.modeling.flops import measured_matmul_flops, train_step_flops
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.training.config import OptimizerConfig
from difflora_jax.training.layout import scanned_runs, to_stacked
from difflora_jax.training.loop import reseed_dropout
from difflora_jax.training.optimizer import make_optimizer
from difflora_jax.training.step import split_for_training, train_step
from difflora_jax.weights.loading import DTYPES, load_model, resolve_source

PEFT = "PyTorch + peft"
EAGER_DIFFLORA = "PyTorch eager DiffLoRA"
OURS = "difflora_jax"


@dataclasses.dataclass
class Runner:
    implementation: str
    method: str
    shape: tuple[int, int]
    setting: str
    trainable: int
    flops: float
    step: Callable[[], Any] = dataclasses.field(repr=False)
    first_call_s: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)

    @property
    def tokens_per_s(self) -> float:
        return self.shape[0] * self.shape[1] / self.step_s


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids, loss on every next token, one unpadded sequence per row."""
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, length + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch, length), np.int32),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
    }


def load_base(source: str, dtype: str) -> LlamaForCausalLM:
    """A checkpoint's weights, or random weights for a shape name (``llama-3.2-1b``)."""
    if source in model_names():
        return LlamaForCausalLM(model_shape(source), dtype=DTYPES[dtype], rngs=nnx.Rngs(0))
    model, _ = load_model(source, dtype=dtype, with_tokenizer=False)
    return model


def jax_runner(
    base: LlamaForCausalLM,
    method: str,
    batch: dict[str, np.ndarray],
    *,
    causal_block: int | None,
    dropout_prng: str,
    scan: bool,
    remat: str,
    stacked: bool = True,
) -> Runner:
    """Our jitted train step of ``method`` on a copy of ``base``; ``stacked``: the adapters in
    the training loop's layout (each scanned run stacked, ``training.layout``), else per layer
    (the layout the step compiled before it)."""
    model = apply_adapters(nnx.clone(base), load_method(method))
    model.set_attention_backend("xla", causal_block=causal_block)
    model.set_layer_execution(scan=scan, remat=remat)
    reseed_dropout(model, 0, dropout_prng)
    optimizer = OptimizerConfig(learning_rate=1e-4, total_steps=1000, max_grad_norm=1.0)
    graphdef, params, rng, rest = split_for_training(model)
    if stacked:
        params, rng = to_stacked((params, rng), scanned_runs(model))
    state = {"params": params, "opt": make_optimizer(optimizer).init(params), "rng": rng}

    def step() -> float:
        p, o, r, metrics = train_step(
            graphdef, state["params"], state["opt"], state["rng"], rest, batch, optimizer=optimizer
        )
        state.update(params=p, opt=o, rng=r)
        return float(metrics["loss"])

    setting = "scanned" if scan else "unrolled"
    setting += f", remat {remat}, " + (f"causal blocks {causal_block}" if causal_block else "dense")
    setting += f", {dropout_prng} dropout"
    if scan and not stacked:
        setting += ", per-layer adapters"
    shape = batch["input_ids"].shape
    return Runner(
        OURS,
        method,
        shape,
        setting,
        count_adapter_params(model),
        train_step_flops(model, *shape),
        step,
    )


def peer_runner(
    source: str, base: LlamaForCausalLM, method: str, batch: dict[str, np.ndarray]
) -> Runner:
    """The PyTorch peer of ``method`` (``bench.peers``) on the same weights."""
    adapter: AdapterConfig = load_method(method)
    if source in model_names():
        torch_model = peers.load_torch_llama(None, config=base.config)
    else:
        torch_model = peers.load_torch_llama(resolve_source(source))
    if adapter.method == "lora":
        step, trainable = peers.peft_lora_step(torch_model, adapter, batch)
        name = PEFT
    else:
        step, trainable = peers.torch_difflora_step(torch_model, base.config, adapter, batch)
        name = EAGER_DIFFLORA
    ours = apply_adapters(nnx.eval_shape(lambda: nnx.clone(base)), adapter)
    shape = batch["input_ids"].shape
    return Runner(name, method, shape, "eager", trainable, train_step_flops(ours, *shape), step)


def _spent() -> None:
    raise RuntimeError("this runner was measured and released")


def measure(runners: Sequence[Runner], repeats: int) -> None:
    """First call of each runner, then ``repeats`` interleaved timed rounds."""
    for runner in runners:
        start = time.perf_counter()
        runner.step()
        runner.first_call_s = time.perf_counter() - start
    for _ in range(repeats):
        for runner in runners:
            start = time.perf_counter()
            runner.step()
            runner.times.append(time.perf_counter() - start)


def _peer_of(run: Runner, runners: Sequence[Runner]) -> Runner | None:
    return next(
        (
            r
            for r in runners
            if r.implementation != OURS and r.method == run.method and r.shape == run.shape
        ),
        None,
    )


def render(runners: Sequence[Runner], matmul_flops: float, args: Any, took: float, info) -> str:
    """The markdown section: one row per runner, then the ratios."""
    lines = header("Train step: speed, compile time, MFU", args.argv, took, info, args.section)
    lines += [
        f"Model: {args.model}, {args.dtype} base weights; float32 adapters and optimizer "
        f"state. Median of {args.repeats} timed steps after one untimed first call. Matmul "
        f"FLOP/s measured here: {matmul_flops / 1e9:,.1f} GFLOP/s ({args.dtype} 1024^3 "
        "products, the best of timings before and after the steps); MFU = model FLOPs per second over that (formula: "
        "`difflora_jax/modeling/flops.py`).",
        "",
        "| implementation | method | B x T | setting | trainable | step s | tokens/s | "
        "first call s | compile s | model GFLOP/step | MFU | vs peer |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runners:
        peer = _peer_of(r, runners) if r.implementation == OURS else None
        ratio = f"{r.tokens_per_s / peer.tokens_per_s:.2f}x {peer.implementation}" if peer else ""
        mfu = r.flops / r.step_s / matmul_flops
        lines.append(
            f"| {r.implementation} | {r.method} | {r.shape[0]} x {r.shape[1]} | {r.setting} | "
            f"{r.trainable:,} | {r.step_s:.2f} | {r.tokens_per_s:,.0f} | {r.first_call_s:.1f} | "
            f"{r.first_call_s - r.step_s:.1f} | "
            f"{r.flops / 1e9:,.0f} | {mfu:.1%} | {ratio} |"
        )
    # each method's step over the LoRA step of the same shape and setting
    ours = [r for r in runners if r.implementation == OURS]
    lora = {(r.shape, r.setting): r for r in ours if load_method(r.method).method == "lora"}
    pairs = [
        (r, lora[r.shape, r.setting])
        for r in ours
        if (r.shape, r.setting) in lora and r not in lora.values()
    ]
    settings = {r.setting for r in ours}
    if pairs:
        lines += [""]
        lines += [
            f"- {r.method} step / {base.method} step at {r.shape[0]} x {r.shape[1]}"
            + (f" ({r.setting})" if len(settings) > 1 else "")
            + f": {r.step_s / base.step_s:.2f}"
            for r, base in pairs
        ]
    return "\n".join(lines)


def run(args: Any) -> str:
    """Run the benchmark described by the parsed ``difflora bench train`` arguments."""
    start, load_before, cpu_before = time.perf_counter(), load_average(), cpu_times()
    cache = compilation_cache(args.compilation_cache)
    if args.peers:
        import torch  # start-up time: the peers need it

        torch.set_num_threads(args.torch_threads)
    base = load_base(args.model, args.dtype)
    matmul = measured_matmul_flops(args.dtype)
    runners: list[Runner] = []
    for index, (batch_size, length) in enumerate(args.shapes):
        batch = random_batch(batch_size, length, base.config.vocab_size)
        group = []
        for method in args.methods:
            for scan, stacked in args.layouts:
                group.append(
                    jax_runner(
                        base,
                        method,
                        batch,
                        causal_block=args.causal_block or None,
                        dropout_prng=args.dropout_prng,
                        scan=scan,
                        remat=args.remat,
                        stacked=stacked,
                    )
                )
            # the peers at the main shape only: the eager DiffLoRA keeps both full attention
            # maps of every layer for the backward pass (tens of GB at 1 x 2048)
            if args.peers and index == 0:
                group.append(peer_runner(args.model, base, method, batch))
        measure(group, args.repeats)
        for runner in group:  # free this shape's models, optimizer states and executables
            runner.step = _spent
        gc.collect()
        runners += group
    matmul = max(matmul, measured_matmul_flops(args.dtype))  # outside load slows one
    info = machine_info(load_before, args.torch_threads if args.peers else None, cache, cpu_before)
    return render(runners, matmul, args, time.perf_counter() - start, info)

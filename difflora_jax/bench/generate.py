"""``difflora bench generate``: prefill and decode speed, compile time, prefill MFU.

The model generates greedily from ``B`` prompts of exactly ``P`` random token ids (fixed seed,
identical for both sides; no padding when ``P`` is a multiple of the 16-token prompt bucket)
and produces exactly ``N`` new tokens (EOS stopping off on both sides). Timed, each ``R``
times after a warm-up call (medians kept):

* **prefill**: one forward pass over the prompts that fills a KV cache and gives the last
  logits: ours is ``generation.prefill``, the jitted function ``generate_ids`` runs (same
  shapes, same executable); transformers' is ``model(ids, use_cache=True, logits_to_keep=1)``,
  the call its ``generate`` starts with;
* **generate**: the public call end to end, ``generate_ids`` / ``model.generate``.

``decode = generate - prefill`` (host loop included); ``decode tok/s = B*N / decode``. Our
compile time is the first ``generate_ids`` call minus the median steady one. With ``--peers``
(CPU) transformers runs on the same weights, the two sides alternating per round; ratios are
ours / transformers. The greedy tokens are compared per row as a sanity check.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
from difflora_jax.bench.train import load_base
from difflora_jax.catalog import load_method, model_names
from difflora_jax.errors import ConfigError
from difflora_jax.generation import (
    PROMPT_BUCKET,
    cache_length,
    generate_ids,
    generation_view,
    left_pad,
    prefill,
)
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.modeling.flops import measured_matmul_flops, prefill_flops
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.weights.loading import resolve_source

CHUNK_SIZE = 16  # generate_ids' default decode chunk


@dataclasses.dataclass
class Runner:
    name: str
    generate: Callable[[], list[list[int]]]  # end to end; the new token ids per row
    prefill: Callable[[], float]  # its own elapsed seconds (setup excluded)
    first_call_s: float = 0.0
    generate_times: list[float] = dataclasses.field(default_factory=list)
    prefill_times: list[float] = dataclasses.field(default_factory=list)
    tokens: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def generate_s(self) -> float:
        return statistics.median(self.generate_times)

    @property
    def prefill_s(self) -> float:
        return statistics.median(self.prefill_times)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def ours(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], new_tokens: int) -> Runner:
    def run_generate() -> list[list[int]]:
        results = generate_ids(
            model, prompts, max_new_tokens=new_tokens, eos_token_ids=[], chunk_size=CHUNK_SIZE
        )
        return [ids for ids, _ in results]

    batch = len(prompts)
    prompt_len = _round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
    input_ids, mask, positions = (jnp.asarray(a) for a in left_pad(prompts, prompt_len))
    view = generation_view(model)  # what generate_ids runs
    graphdef, state = nnx.split(view)
    cache_len = cache_length(
        prompt_len + _round_up(new_tokens, CHUNK_SIZE), model.config.max_position_embeddings
    )

    def run_prefill() -> float:
        cache = jax.block_until_ready(view.init_cache(batch, cache_len))  # donated: fresh
        start = time.perf_counter()
        out = prefill(graphdef, state, input_ids, mask, positions, cache)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    return Runner("difflora_jax", run_generate, run_prefill)


def transformers_peer(torch_model: Any, prompts: Sequence[Sequence[int]], new_tokens: int):
    import torch

    torch_model.eval()
    torch_model.generation_config.eos_token_id = None  # generate() would fill it in
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run_generate() -> list[list[int]]:
        out = torch_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return out[:, ids.shape[1] :].tolist()

    @torch.inference_mode()
    def run_prefill() -> float:
        start = time.perf_counter()
        out = torch_model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).tolist()
        return time.perf_counter() - start

    return Runner("transformers", run_generate, run_prefill)


def measure(runners: Sequence[Runner], repeats: int) -> None:
    for runner in runners:
        start = time.perf_counter()
        runner.tokens = runner.generate()  # ours: compiles prefill and the decode chunk
        runner.first_call_s = time.perf_counter() - start
        runner.prefill()
    for _ in range(repeats):
        for runner in runners:
            start = time.perf_counter()
            runner.tokens = runner.generate()
            runner.generate_times.append(time.perf_counter() - start)
        for runner in runners:
            runner.prefill_times.append(runner.prefill())


def _agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    return f"{same}/{len(a)} rows identical"


def run(args: Any) -> str:
    """Run the benchmark described by the parsed ``difflora bench generate`` arguments."""
    start, load_before, cpu_before = time.perf_counter(), load_average(), cpu_times()
    cache = compilation_cache(args.compilation_cache)
    matmul = measured_matmul_flops(args.dtype)
    base = load_base(args.model, args.dtype)
    model = apply_adapters(base, load_method(args.method)) if args.method else base
    torch_model = None
    if args.peers:
        import torch  # start-up time: the peer needs it

        if args.method:
            raise ConfigError("--peers compares the base model alone; leave out --method")
        torch.set_num_threads(args.torch_threads)
        config = model.config if args.model in model_names() else None
        path = None if config is not None else resolve_source(args.model)
        torch_model = peers.load_torch_llama(path, config=config)
    rows = []
    for batch in args.batches:
        prompts = np.random.default_rng(batch).integers(
            0, model.config.vocab_size, (batch, args.prompt_tokens)
        )
        prompts = prompts.tolist()
        runners = [ours(model, prompts, args.new_tokens)]
        if torch_model is not None:
            runners.append(transformers_peer(torch_model, prompts, args.new_tokens))
        measure(runners, args.repeats)
        rows.append((batch, runners))
    matmul = max(matmul, measured_matmul_flops(args.dtype))  # outside load slows one
    info = machine_info(load_before, args.torch_threads if args.peers else None, cache, cpu_before)
    return _render(rows, model, matmul, args, time.perf_counter() - start, info)


def _render(rows, model, matmul, args, took, info) -> str:
    p, n = args.prompt_tokens, args.new_tokens
    lines = header("Generation: prefill and decode", args.argv, took, info, args.section)
    lines += [
        f"Model: {args.model}, {args.dtype}"
        + (f", with {args.method} adapters" if args.method else "")
        + f". Greedy; B prompts of exactly {p} random token ids; exactly {n} new tokens. "
        f"Medians of {args.repeats} timed runs after a warm-up. decode = generate - prefill. "
        f"Prefill MFU against the {matmul / 1e9:,.1f} GFLOP/s measured here (best of "
        "matmul timings before and after).",
        "",
        "| B | implementation | prefill ms | prefill tok/s | prefill MFU | decode ms/step | "
        "decode tok/s | generate s | first call - steady s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for batch, runners in rows:
        for r in runners:
            decode = r.generate_s - r.prefill_s
            mfu = prefill_flops(model, batch, p) / r.prefill_s / matmul
            lines.append(
                f"| {batch} | {r.name} | {r.prefill_s * 1e3:,.1f} | {batch * p / r.prefill_s:,.0f}"
                f" | {mfu:.1%} | {decode / n * 1e3:,.1f} | {batch * n / decode:,.1f} | "
                f"{r.generate_s:.2f} | {r.first_call_s - r.generate_s:.2f} |"
            )
        if len(runners) == 2:
            a, b = runners
            ratios.append(
                f"| {batch} | {b.prefill_s / a.prefill_s:.2f}x | "
                f"{(b.generate_s - b.prefill_s) / (a.generate_s - a.prefill_s):.2f}x | "
                f"{_agreement(a.tokens, b.tokens)} |"
            )
    if ratios:
        lines += [
            "",
            "| B | prefill ours/transformers | decode ours/transformers | greedy tokens |",
            "|---:|---:|---:|---|",
            *ratios,
        ]
    return "\n".join(lines)

"""Generation speed on CPU: difflora_jax against transformers' PyTorch ``generate``.

What is measured
----------------
SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32 on both sides) generates
greedily from a batch of ``B`` prompts of exactly ``P`` tokens each (windows of one fixed text,
tokenized once, so both implementations get identical token ids; no padding when ``P`` is a
multiple of difflora_jax's 16-token prompt bucket) and produces
exactly ``N`` new tokens: EOS never ends a row (``eos_token_ids=[]`` for difflora_jax, the
model's ``generation_config.eos_token_id`` unset for transformers; both outputs are checked
to hold ``N`` tokens).

For each implementation and batch size two things are timed, each ``R`` times after a warm-up
call, and the median is kept:

* **prefill**: one forward pass over the prompt batch that fills a KV cache and yields the
  last-position logits. difflora_jax: ``generation.prefill``, the same jitted function (same
  shapes, so the same executable) that ``generate_ids`` runs, on a fresh cache of the size
  ``generate_ids`` allocates. transformers: ``model(ids, attention_mask, use_cache=True,
  logits_to_keep=1)``, the call ``generate`` makes for its first step.
* **generate**: the end-to-end public call, ``generate_ids(model, prompts, max_new_tokens=N)``
  and ``model.generate(ids, max_new_tokens=N, do_sample=False)``, prompt in, token ids out.

Derived: ``prefill tok/s = B*P / prefill``; ``decode = generate - prefill`` (the cost of the
``N`` generated tokens beyond the prompt pass, host-side loop overhead included);
``decode tok/s = B*N / decode``. Ratios are ours / transformers (> 1: difflora_jax is faster).
JAX compile time is excluded from all of these; it is reported as ``compile s`` = first
``generate_ids`` call minus the median steady one (the warm-up compiles prefill and the
decode chunk). transformers' first-call overhead is reported the same way.

The two sides never run concurrently; after both are warmed up, their timed calls alternate
(round r: JAX generate, PyTorch generate, JAX prefill, PyTorch prefill), so drifts and bursts
of outside load hit both. The load average before and after the run is recorded, and the
written section carries a warning when it exceeds the core count: on a busy machine PyTorch's
many small multi-threaded ops (a thread barrier each) can slow down far more than XLA's fused
decode step, so the ratios then say little. JAX uses XLA's CPU thread pool as configured by
default; PyTorch runs with ``torch.set_num_threads(--torch-threads)`` (default: the CPU
count). The greedy tokens of
the two sides are compared per row as a sanity check (float32 on both sides, so they normally
agree; a late divergence after a near-tie is possible and is reported, not hidden).

Run from the repository root, e.g.::

    python experiments/benchmarks/generation_speed.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from flax import nnx

from difflora_jax.generation import PROMPT_BUCKET, generate_ids, left_pad, prefill
from difflora_jax.weights.loading import load_model, resolve_source

ALIAS = "smollm2-135m-instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]
START_MARKER = "<!-- generation_speed:start -->"
END_MARKER = "<!-- generation_speed:end -->"
DOC_HEADER = (
    "# Benchmarks\n\n"
    "Measured numbers, each section written by the script named in it (never edited by hand).\n"
)
LOAD_KEY = "load average (1/5/15 min) before / after the run"
ROW_STRIDE = 23  # token offset between the prompt windows of consecutive batch rows
CHUNK_SIZE = 16  # generate_ids' default decode chunk

# One fixed text; prompts are token windows of it (repeated as often as needed).
FIXED_TEXT = (
    "Differential attention computes two softmax attention maps from separate query and key "
    "projections and subtracts one from the other, scaled by a learnable factor. The "
    "subtraction cancels attention noise that both maps share, so the remaining weight "
    "concentrates on the tokens that matter for the prediction. Low-rank adapters make it "
    "cheap to add the second map to a pretrained model: the new projections start as small "
    "updates of the existing ones and are trained while the base weights stay frozen. "
    "A small language model such as SmolLM2 with one hundred and thirty-five million "
    "parameters runs comfortably on a laptop CPU, which makes it a convenient subject for "
    "measuring how quickly a framework turns a prompt into new tokens. Generation has two "
    "phases. During prefill the whole prompt passes through the network at once, filling the "
    "key-value cache; this phase is dominated by large matrix multiplications and scales well "
    "with the number of cores. During decode one token per sequence passes through the network "
    "per step, reading every weight once per step, so the speed is bound by memory bandwidth "
    "and by the fixed overhead of launching each step. Batching several prompts amortizes that "
    "overhead, because the weights read for one sequence serve all of them. "
)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Medians (seconds) for one implementation at one batch size, plus its greedy tokens."""

    prefill_s: float
    generate_s: float
    first_call_s: float
    tokens: list[list[int]]

    @property
    def decode_s(self) -> float:
        """Generation time beyond the prompt pass."""
        return self.generate_s - self.prefill_s

    @property
    def warmup_overhead_s(self) -> float:
        """First ``generate`` call minus the median steady one (JAX: jit compilation)."""
        return self.first_call_s - self.generate_s


@dataclasses.dataclass(frozen=True)
class Row:
    """Results for one batch size."""

    batch: int
    ours: Timing
    reference: Timing


def build_prompts(tokenizer, batch: int, prompt_tokens: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``prompt_tokens`` ids: shifted windows of ``FIXED_TEXT``."""
    needed = prompt_tokens + (batch - 1) * ROW_STRIDE
    text = FIXED_TEXT
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    while len(ids) < needed:
        text += FIXED_TEXT
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [ids[r * ROW_STRIDE : r * ROW_STRIDE + prompt_tokens] for r in range(batch)]


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Runner:
    """One implementation's two timed calls for one prompt batch."""

    generate: Callable[[], list[list[int]]]  # end to end; returns the new token ids per row
    prefill: Callable[[], float]  # returns its own elapsed seconds (setup excluded)


def ours_runner(
    model, prompts: Sequence[Sequence[int]], new_tokens: int, pad_token_id: int
) -> Runner:
    """difflora_jax: ``generate_ids`` end to end, and its jitted prefill alone."""

    def run_generate() -> list[list[int]]:
        results = generate_ids(
            model,
            prompts,
            max_new_tokens=new_tokens,
            temperature=0.0,
            eos_token_ids=[],
            pad_token_id=pad_token_id,
            chunk_size=CHUNK_SIZE,
        )
        return [ids for ids, _ in results]  # host lists: the device work is done

    # The inputs generate_ids builds (left-padded to its bucket; no padding when the prompt
    # length is a multiple of PROMPT_BUCKET) and a cache of the size it allocates, so that
    # prefill hits the executable that generate_ids compiles.
    batch = len(prompts)
    prompt_len = _round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
    input_ids, mask, positions = left_pad(prompts, prompt_len, pad_token_id)
    graphdef, state = nnx.split(model)
    cache_len = prompt_len + _round_up(new_tokens, CHUNK_SIZE)

    def run_prefill() -> float:
        cache = jax.block_until_ready(model.init_cache(batch, cache_len))  # donated: fresh
        start = time.perf_counter()
        logits, cache = prefill(graphdef, state, input_ids, mask, positions, cache)
        jax.block_until_ready((logits, cache))
        return time.perf_counter() - start

    return Runner(generate=run_generate, prefill=run_prefill)


def load_reference(torch_threads: int):
    """transformers' ``LlamaForCausalLM`` on the same GGUF file, float32, EOS stopping off."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(torch_threads)
    path = resolve_source(ALIAS)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    # generate() fills unset arguments from model.generation_config, so EOS is unset there.
    model.generation_config.eos_token_id = None
    return model


def reference_runner(
    model, prompts: Sequence[Sequence[int]], new_tokens: int, pad_token_id: int
) -> Runner:
    """transformers: ``model.generate`` end to end, and the prefill forward it starts with."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run_generate() -> list[list[int]]:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
        return out[:, ids.shape[1] :].tolist()

    @torch.inference_mode()
    def run_prefill() -> float:
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).tolist()  # materialize (CPU ops are synchronous anyway)
        return time.perf_counter() - start

    return Runner(generate=run_generate, prefill=run_prefill)


def measure(runners: Sequence[Runner], repeats: int) -> list[Timing]:
    """Warm up every runner, then time ``repeats`` rounds, the runners interleaved per round.

    Interleaving (A B A B ...) spreads slow drifts and bursts of outside load over both sides
    instead of charging them to whichever side happened to run at the time.
    """
    first_calls, tokens = [], []
    for runner in runners:
        elapsed, ids = _timed(runner.generate)  # JAX: compiles prefill and the decode chunk
        first_calls.append(elapsed)
        tokens.append(ids)
        runner.prefill()  # warm-up (JAX: normally already compiled by generate)
    generate_times: list[list[float]] = [[] for _ in runners]
    prefill_times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, runner in enumerate(runners):
            elapsed, tokens[i] = _timed(runner.generate)
            generate_times[i].append(elapsed)
        for i, runner in enumerate(runners):
            prefill_times[i].append(runner.prefill())
    return [
        Timing(
            prefill_s=statistics.median(prefill_times[i]),
            generate_s=statistics.median(generate_times[i]),
            first_call_s=first_calls[i],
            tokens=tokens[i],
        )
        for i in range(len(runners))
    ]


def agreement(ours: list[list[int]], reference: list[list[int]]) -> str:
    """Per-row greedy token comparison, e.g. ``4/4 rows identical``."""
    same = sum(a == b for a, b in zip(ours, reference))
    text = f"{same}/{len(ours)} rows identical"
    diverging = []
    for row, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            diverging.append(f"row {row} from token {first}")
    return text + (f" ({'; '.join(diverging)})" if diverging else "")


def load_average() -> str:
    """The 1/5/15-minute load averages (other work on the machine skews every number)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_info(torch_threads: int, load_before: str) -> dict[str, str]:
    """CPU model, core count, load, library versions and JAX backend."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {
        name: importlib.metadata.version(name)
        for name in ("jax", "jaxlib", "flax", "torch", "transformers")
    }
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        LOAD_KEY: f"{load_before} / {load_average()}",
        "JAX backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "PyTorch threads": str(torch_threads),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items())
        + f", Python {platform.python_version()}",
    }


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def results_table(rows: Sequence[Row], prompt_tokens: int, new_tokens: int) -> str:
    """Markdown tables: per-implementation timings, then ratios and the greedy sanity check."""
    lines = [
        "| B | implementation | prefill ms | prefill tok/s | decode ms/token step | "
        "decode tok/s | generate s (end to end) | first-call overhead s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for name, t in (("difflora_jax", row.ours), ("transformers", row.reference)):
            overhead = _fmt(t.warmup_overhead_s, 2) + (" (compile)" if t is row.ours else "")
            lines.append(
                f"| {row.batch} | {name} | {_fmt(t.prefill_s * 1e3)} "
                f"| {_fmt(row.batch * prompt_tokens / t.prefill_s)} "
                f"| {_fmt(t.decode_s * 1e3 / new_tokens)} "
                f"| {_fmt(row.batch * new_tokens / t.decode_s)} "
                f"| {_fmt(t.generate_s, 2)} | {overhead} |"
            )
    lines += [
        "",
        "| B | prefill ours/transformers | decode ours/transformers | "
        "generate ours/transformers (speed) | greedy tokens |",
        "|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        o, r = row.ours, row.reference
        lines.append(
            f"| {row.batch} | {r.prefill_s / o.prefill_s:.2f}x | {r.decode_s / o.decode_s:.2f}x "
            f"| {r.generate_s / o.generate_s:.2f}x | {agreement(o.tokens, r.tokens)} |"
        )
    return "\n".join(lines)


def render_section(
    command: str, info: dict[str, str], table: str, args: argparse.Namespace, runtime_s: float
) -> str:
    """The markdown between the generation_speed markers."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    padded = _round_up(args.prompt_tokens, PROMPT_BUCKET)
    padding = (
        "no padding"
        if padded == args.prompt_tokens
        else f"no padding for transformers; difflora_jax left-pads to its {padded}-token bucket"
    )
    return (
        f"{START_MARKER}\n"
        "## Generation speed: difflora_jax vs transformers (CPU)\n\n"
        f"Written by `experiments/benchmarks/generation_speed.py` on {date}; "
        f"the whole run took {runtime_s:.0f} s.\n\n"
        f"```\n{command}\n```\n\n"
        f"{machine}\n\n"
        f"Model: SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantized to float32 on both "
        f"sides). Greedy, B prompts of exactly {args.prompt_tokens} tokens (identical ids on "
        f"both sides, {padding}), exactly {args.new_tokens} new tokens (EOS stopping off). "
        f"Medians of {args.repeats} timed run(s) after one warm-up. prefill = one forward pass "
        f"over the prompts that fills the KV cache; generate = the public end-to-end call "
        f"(`generate_ids` / `model.generate`); decode = generate - prefill; "
        f"prefill tok/s = B*{args.prompt_tokens}/prefill, decode tok/s = "
        f"B*{args.new_tokens}/decode. Ratios > 1 mean difflora_jax is faster. JAX compile time "
        f"is excluded from the timings and shown as first-call overhead. See the script's "
        f"docstring for details.\n\n"
        f"{_load_warning(info)}{table}\n"
        f"{END_MARKER}"
    )


def _load_warning(info: dict[str, str]) -> str:
    loads = re.findall(r"\d+\.\d+", info.get(LOAD_KEY, ""))
    cores = os.cpu_count() or 1
    if loads and max(float(x) for x in loads) > cores:
        return (
            f"**Warning: the load average exceeded the {cores} cores during this run (other "
            f"processes competed for the CPU); these numbers are skewed. Rerun on an idle "
            f"machine.**\n\n"
        )
    return ""


def write_section(path: Path, section: str) -> None:
    """Replace the marked section of ``path`` (append it, or create the file, if absent)."""
    text = path.read_text() if path.exists() else DOC_HEADER
    pattern = re.compile(re.escape(START_MARKER) + r".*?" + re.escape(END_MARKER), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *sys.argv[1:]])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torch-threads", type=int, default=os.cpu_count() or 1, help="default: CPU count"
    )
    parser.add_argument(
        "--write", type=Path, default=None, help="markdown file whose marked section to rewrite"
    )
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "new_tokens", "repeats", "torch_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables, and optionally write them to a markdown file."""
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = load_average()
    if float(load_before.split()[0] if load_before != "unknown" else 0) > 0.5:
        print(f"warning: load average {load_before}: other work will skew the timings")
    # CPU has no buffer donation; prefill / _decode_chunk donate their cache anyway.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

    model, tokenizer = load_model(ALIAS, dtype="float32")
    reference = load_reference(args.torch_threads)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if args.prompt_tokens + args.new_tokens > model.config.max_position_embeddings:
        raise SystemExit("--prompt-tokens + --new-tokens exceeds the model's context length")

    rows = []
    for batch in args.batch_sizes:
        prompts = build_prompts(tokenizer, batch, args.prompt_tokens)
        print(f"B={batch}: timing difflora_jax and transformers ...", flush=True)
        ours, ref = measure(
            [
                ours_runner(model, prompts, args.new_tokens, pad_token_id),
                reference_runner(reference, prompts, args.new_tokens, pad_token_id),
            ],
            args.repeats,
        )
        for name, t in (("difflora_jax", ours), ("transformers", ref)):
            lengths = {len(ids) for ids in t.tokens}
            if lengths != {args.new_tokens}:
                raise SystemExit(f"{name} generated {lengths} tokens, not {args.new_tokens}")
        rows.append(Row(batch=batch, ours=ours, reference=ref))

    table = results_table(rows, args.prompt_tokens, args.new_tokens)
    info = machine_info(args.torch_threads, load_before)
    runtime_s = time.perf_counter() - started
    print()
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print()
    print(table)
    print(f"\ntotal runtime: {runtime_s:.1f} s")
    if args.write is not None:
        write_section(args.write, render_section(_command_line(), info, table, args, runtime_s))
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train-step speed: difflora_jax (LoRA and DiffLoRA) against PyTorch + ``peft`` LoRA.

What is measured
----------------
SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32 on both sides), one batch of
``B x T`` token ids (default 4 x 512, random ids from a fixed seed, identical on both sides; loss
on every next token). One *train step* = forward, loss, backward to the adapters, gradient
clipping and an AdamW update:

* difflora_jax: ``training.step.train_step`` (the jitted step the training loop runs), for each
  method YAML given (default ``lora-r8`` and ``difflora-32``, adapter dropout as in the file);
* PyTorch: ``peft.get_peft_model`` with the same LoRA settings as ``lora-r8`` (r=8, alpha=16,
  dropout 0.1, all seven linears), ``torch.optim.AdamW`` over the adapter parameters,
  ``clip_grad_norm_``; ``torch.set_num_threads(--torch-threads)``.

Each configuration is warmed up (JAX compile time is reported separately), then timed ``R``
times; the median is kept. The timed rounds alternate between the implementations, so bursts of
outside load hit all of them. ``tokens/s = B*T / step``; the ratio column divides by PyTorch +
peft LoRA's tokens/s (> 1: faster than it).

    python experiments/benchmarks/train_speed.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_speed import DOC_HEADER, load_average, machine_info

from difflora_jax.catalog import load_method
from difflora_jax.modeling.adapters import apply_adapters, count_adapter_params
from difflora_jax.training.config import DROPOUT_PRNGS, OptimizerConfig
from difflora_jax.training.loop import reseed_dropout
from difflora_jax.training.optimizer import make_optimizer
from difflora_jax.training.step import split_for_training, train_step
from difflora_jax.weights.loading import load_model, resolve_source

ALIAS = "smollm2-135m-instruct"
START, END = "<!-- train_speed:start -->", "<!-- train_speed:end -->"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class Runner:
    name: str
    method: str
    trainable: int
    step: Callable[[], None]
    attention: str = ""
    first_call_s: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)


def make_batch(batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab, (batch, length + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((batch, length), np.int32),
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
    }


def ours(base, method: str, batch: dict[str, np.ndarray], causal_block: int, prng: str) -> Runner:
    model = apply_adapters(nnx.clone(base), load_method(method))
    model.set_attention_backend("xla", causal_block=causal_block or None)
    reseed_dropout(model, 0, prng)
    optimizer = OptimizerConfig(learning_rate=1e-4, total_steps=1000, max_grad_norm=1.0)
    graphdef, params, rng, rest = split_for_training(model)
    state = {"params": params, "opt": make_optimizer(optimizer).init(params), "rng": rng}

    def step() -> None:
        p, o, r, metrics = train_step(
            graphdef, state["params"], state["opt"], state["rng"], rest, batch, optimizer=optimizer
        )
        jax.block_until_ready(metrics["loss"])
        state.update(params=p, opt=o, rng=r)

    attention = f"XLA, causal blocks of {causal_block}" if causal_block else "XLA, dense"
    attention += f"; {prng} dropout keys"
    return Runner("difflora_jax", method, count_adapter_params(model), step, attention)


def pytorch_peft(batch: dict[str, np.ndarray], threads: int) -> Runner:
    import peft
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = resolve_source(ALIAS)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    lora = load_method("lora-r8")
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=PEFT_TARGETS,
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)

    def step() -> None:
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Runner(
        "PyTorch + peft", "lora-r8", sum(p.numel() for p in params), step, "eager (PyTorch)"
    )


def measure(runners: Sequence[Runner], repeats: int) -> None:
    for runner in runners:
        start = time.perf_counter()
        runner.step()
        runner.first_call_s = time.perf_counter() - start
    for _ in range(repeats):
        for runner in runners:
            start = time.perf_counter()
            runner.step()
            runner.times.append(time.perf_counter() - start)


def render(runners: Sequence[Runner], args: argparse.Namespace, info: dict, took: float) -> str:
    tokens = args.batch * args.length
    reference = next(r for r in runners if r.name == "PyTorch + peft")
    ref_speed = tokens / statistics.median(reference.times)
    lines = [
        START,
        "## Train-step speed: difflora_jax vs PyTorch + peft (CPU)",
        "",
        f"Written by `experiments/benchmarks/train_speed.py` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the run took "
        f"{took:.0f} s.",
        "",
        "```",
        shlex.join(["python", "experiments/benchmarks/train_speed.py", *sys.argv[1:]]),
        "```",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        f"SmolLM2-135M-Instruct, float32 base weights, batch {args.batch} x {args.length} tokens, "
        f"one step = forward + loss + backward to the adapters + clip + AdamW. Median of "
        f"{args.repeats} timed steps after one warm-up step (JAX: includes compilation).",
        "",
        "| implementation | method | attention, dropout keys | trainable params | step s | tokens/s | vs PyTorch + peft LoRA | first call s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in runners:
        step = statistics.median(r.times)
        lines.append(
            f"| {r.name} | {r.method} | {r.attention} | {r.trainable:,} | {step:.2f} | "
            f"{tokens / step:,.0f} | "
            f"{tokens / step / ref_speed:.2f}x | {r.first_call_s:.1f} |"
        )
    lines.append(END)
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else DOC_HEADER
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    text = (
        pattern.sub(lambda _: section, text, count=1)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + section + "\n"
    )
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train-step tokens/s vs PyTorch + peft.")
    p.add_argument("--methods", nargs="+", default=["lora-r8", "difflora-32"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--causal-blocks",
        type=int,
        nargs="+",
        default=[256],
        help="query-block sizes of the XLA attention to run each method with (0: dense)",
    )
    p.add_argument(
        "--dropout-prngs",
        nargs="+",
        default=[DROPOUT_PRNGS[0]],
        choices=DROPOUT_PRNGS,
        help="generators of the adapter-dropout keys to run each method with",
    )
    p.add_argument("--torch-threads", type=int, default=len(__import__("os").sched_getaffinity(0)))
    p.add_argument("--write", type=Path, default=None)
    args = p.parse_args(argv)
    start, load_before = time.perf_counter(), load_average()
    base, _ = load_model(ALIAS, dtype="float32", with_tokenizer=False)
    batch = make_batch(args.batch, args.length, base.config.vocab_size)
    runners = [
        ours(base, m, batch, block, prng)
        for m in args.methods
        for block in args.causal_blocks
        for prng in args.dropout_prngs
    ]
    runners.append(pytorch_peft(batch, args.torch_threads))
    measure(runners, args.repeats)
    section = render(
        runners, args, machine_info(args.torch_threads, load_before), time.perf_counter() - start
    )
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``difflora`` command.

Each subcommand imports what it needs inside its function: ``difflora --help`` and argument
errors then answer in well under a second instead of loading JAX, Orbax and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from difflora_jax.config import DROPOUT_PRNGS, REMAT_POLICIES
from difflora_jax.errors import DiffLoRAError
from difflora_jax.host_memory import keep_freed_memory


class _Parser(argparse.ArgumentParser):
    """argparse with one error form for every subcommand: ``difflora: error: ...`` (exit 2),
    the form input errors also take (exit 1)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"difflora: error: {message} (see: {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a Hugging Face model directory, a .gguf file, or an alias (smollm2-135m-instruct)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="difflora", description="DiffLoRA for Llama-family models in JAX / Flax NNX."
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    gen = commands.add_parser("generate", help="generate text from a prompt")
    _add_model_args(gen)
    gen.add_argument(
        "--prompt", required=True, action="append", help="prompt text (repeat for a batch)"
    )
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=_probability, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    info = commands.add_parser("info", help="print a model's configuration and parameter count")
    _add_model_args(info)

    params = commands.add_parser(
        "params", help="count trainable adapter parameters (abstract shapes, no weights needed)"
    )
    params.add_argument(
        "--model",
        required=True,
        help="a shape alias (llama-3.2-1b, smollm2-135m, ...) or a checkpoint (only its config is read)",
    )
    params.add_argument(
        "--method",
        action="append",
        help="a methods YAML or a method name such as difflora-32 (repeatable; default: the "
        "paper's variants)",
    )
    params.add_argument("--per-layer", action="store_true", help="print every layer's count")
    params.add_argument("--json", action="store_true")

    tr = commands.add_parser(
        "train", help="train adapters on a base model (a TrainConfig YAML plus overrides)"
    )
    tr.add_argument("--config", required=True, help="a TrainConfig YAML file")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its latest checkpoint (or start it there)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = tr.add_argument_group(
        "multi-host (every process runs the same command; without these, jax.distributed is "
        "started by itself on TPU VM pod slices and under SLURM / Open MPI)"
    )
    multi.add_argument("--coordinator-address", help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=_positive_int)
    multi.add_argument("--process-id", type=int)
    multi.add_argument(
        "--local-devices", type=_positive_int, help="CPU devices per process (CPU runs and tests)"
    )
    tr.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config fields, dotted for nested ones: max_steps=100 data.max_length=256",
    )

    ex = commands.add_parser(
        "export",
        help="export an adapter checkpoint: PEFT, reference DiffLoRA, or merged HF checkpoint",
    )
    ex.add_argument(
        "--adapter",
        required=True,
        help="an adapter checkpoint: a run directory, its checkpoints/ or one step directory",
    )
    ex.add_argument(
        "--format",
        required=True,
        choices=["peft", "reference", "merged"],
        help="peft: adapter_config.json + adapter_model.safetensors (LoRA); reference: the "
        "DiffLoRA reference code's config.json + model.safetensors; merged: a HF Llama "
        "checkpoint with the adapters folded into the base weights",
    )
    ex.add_argument("--out", required=True, help="the output directory (must not exist)")
    ex.add_argument(
        "--model",
        help="the base model (default: the one the checkpoint records); read for --format merged",
    )

    im = commands.add_parser(
        "import", help="import a PEFT or reference DiffLoRA adapter as an adapter checkpoint"
    )
    im.add_argument("--format", required=True, choices=["peft", "reference"])
    im.add_argument("--path", required=True, help="the adapter directory to read")
    im.add_argument(
        "--out", required=True, help="the checkpoint directory to write (must not exist)"
    )
    im.add_argument(
        "--model",
        help="the base model (default: the one the adapter's config names: PEFT's "
        "base_model_name_or_path, the reference config's _name_or_path)",
    )
    _add_bench_parser(commands)
    _add_plan_parser(commands)
    _add_eval_parser(commands)
    _add_lm_eval_parser(commands)
    _add_reproduce_parser(commands)
    return parser


def _shapes(text: str) -> list[tuple[int, int]]:
    """``4x512,1x2048`` -> ``[(4, 512), (1, 2048)]``."""
    try:
        shapes = [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of BATCHxLENGTH, e.g. 4x512")
    return [(s[0], s[1]) for s in shapes]


def _int_list(text: str) -> list[int]:
    values = [_positive_int(item) for item in text.split(",")]
    return values


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="measure train-step or generation speed (writes docs/benchmarks.md)"
    )
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=_Parser)
    for name, text in (
        ("train", "train-step time, compile time and MFU, optionally against PyTorch peers"),
        ("generate", "prefill and decode speed, optionally against transformers"),
    ):
        p = kinds.add_parser(name, help=text)
        p.add_argument(
            "--model",
            default="smollm2-135m-instruct",
            help="a checkpoint, an alias, or a shape name (llama-3.2-1b: random weights)",
        )
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        p.add_argument("--repeats", type=_positive_int, default=3)
        p.add_argument(
            "--peers",
            action="store_true",
            help="also time the PyTorch peers (needs torch; train: at --batch x --seq-len only)",
        )
        p.add_argument("--torch-threads", type=_positive_int, default=len(os.sched_getaffinity(0)))
        p.add_argument("--write", help="write the section into this markdown file")
        p.add_argument(
            "--section",
            default="",
            help="name the section bench-KIND-SECTION (several runs of one kind in one file)",
        )
        p.add_argument(
            "--compilation-cache",
            metavar="DIR",
            help="JAX's persistent compilation cache (default: JAX_COMPILATION_CACHE_DIR, or "
            "none); the header says how many entries it held, so a warm first call is labelled",
        )
        if name == "train":
            p.add_argument("--methods", default="lora-r8,difflora-32", help="comma-separated")
            p.add_argument("--batch", type=_positive_int, default=4)
            p.add_argument("--seq-len", type=_positive_int, default=512)
            p.add_argument(
                "--shapes", type=_shapes, default=[], help="more BATCHxLENGTH shapes: 1x2048"
            )
            p.add_argument("--causal-block", type=int, default=128, help="0: dense attention")
            p.add_argument("--dropout-prng", choices=DROPOUT_PRNGS, default=DROPOUT_PRNGS[0])
            p.add_argument("--remat", choices=REMAT_POLICIES, default="none")
            p.add_argument(
                "--also-unrolled", action="store_true", help="time unrolled layers as well"
            )
            p.add_argument(
                "--also-per-layer",
                action="store_true",
                help="time the scanned step with the adapters stored per layer as well",
            )
        else:
            p.add_argument("--method", help="add fresh adapters of this method (default: none)")
            p.add_argument("--batches", type=_int_list, default=[1, 4], help="e.g. 1,4")
            p.add_argument("--prompt-tokens", type=_positive_int, default=128)
            p.add_argument("--new-tokens", type=_positive_int, default=64)


def _mesh_arg(text: str) -> dict[str, int]:
    """``fsdp=8,tensor=2`` -> ``{"fsdp": 8, "tensor": 2}``."""
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in ("data", "fsdp", "tensor"):
            raise argparse.ArgumentTypeError(
                f"{part!r} is not AXIS=SIZE with AXIS one of data, fsdp, tensor"
            )
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: {value!r} is not an integer") from None
    return out


def _add_eval_parser(commands) -> None:
    p = commands.add_parser(
        "eval", help="run the paper's evaluations (needle-in-a-haystack, HumanEval) on a model"
    )
    _add_model_args(p)
    p.add_argument("--adapter", help="an adapter checkpoint directory (trained adapters)")
    p.add_argument(
        "--task",
        required=True,
        help="comma-separated: nih-single, nih-mk2, nih-mk3, nih-mv, icl, rag, humaneval, "
        "attention-mass, perplexity",
    )
    p.add_argument("--lengths", type=_int_list, default=[1024], help="prompt tokens: 1024,2048")
    p.add_argument("--shots", type=_int_list, default=[4, 16, 64], help="icl demonstrations")
    p.add_argument("--distractors", type=_int_list, default=[4, 9, 19], help="rag distractors")
    p.add_argument("--num", type=_positive_int, default=20, help="items per length (or problems)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        help="real data instead of the generated items (nih-*, icl, rag): a JSONL file, "
        "hf:NAME[:SPLIT] or tfds:NAME[:SPLIT]; perplexity: a .txt or {text} JSONL",
    )
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--max-new-tokens", type=_positive_int)
    p.add_argument("--out", required=True, help="a new directory: results.json and table.md")
    p.add_argument("--no-progress", action="store_true")


def _eval(args: argparse.Namespace) -> None:
    from difflora_jax.evaluation import suite  # start-up time (module docstring)
    from difflora_jax.weights.loading import load_model  # start-up time

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DiffLoRAError(f"--out {out} exists and is not an empty directory")
    tasks = [t for t in args.task.split(",") if t]
    for task in tasks:
        if task not in suite.EVAL_TASKS:
            raise DiffLoRAError(f"unknown task {task!r}; known: {list(suite.EVAL_TASKS)}")
    model, tokenizer = load_model(args.model, dtype=args.dtype, adapter=args.adapter)
    if tokenizer is None:
        raise DiffLoRAError(f"{args.model} has no tokenizer; evaluations need one")
    records = []
    for task in tasks:
        records += suite.run_task(
            task,
            model,
            tokenizer,
            lengths=args.lengths,
            shots=args.shots,
            distractors=args.distractors,
            num=args.num,
            seed=args.seed,
            data=args.data,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
        )
    rows = suite.summarize(records)
    attention = suite.summarize_attention(records)
    meta = {
        "command": "difflora " + " ".join(args.argv),
        "date": suite.timestamp(),
        "model": args.model,
        "adapter": args.adapter,
    }
    suite.write_results(out, meta, records, rows)
    if rows:
        print(suite.markdown_table(rows))
    if attention:
        print(suite.attention_table(attention))


def _add_reproduce_parser(commands) -> None:
    p = commands.add_parser(
        "reproduce",
        help="one of the paper's tables or figures (or all): train the variants, evaluate, plot",
    )
    p.add_argument(
        "artifact",
        choices=["table2", "fig1", "fig2", "fig3", "table1", "table3", "fig4", "all"],
        help="table2: hyperparameters and parameter counts; fig1: general abilities; fig2: "
        "many-shot ICL; fig3: needle-in-a-haystack; table1/table3: RAG; fig4: attention mass",
    )
    p.add_argument("--preset", required=True, help="cpu-small, paper, or a preset YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a preset field: train.max_steps=100, eval.nih_lengths=[1024,2048]",
    )
    p.add_argument(
        "--out",
        help="the reproduction directory (default runs/reproduce-<preset>); checkpoints and "
        "scores already there are reused",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="every step at toy size: a tiny random model of the preset's architecture",
    )
    p.add_argument("--no-progress", action="store_true")


def _reproduce(args: argparse.Namespace) -> None:
    from difflora_jax.reproduce import load_preset, reproduce  # start-up time (docstring)

    preset = load_preset(args.preset, args.overrides)
    default = f"runs/reproduce-{preset.name}{'-dry-run' if args.dry_run else ''}"
    reproduce(
        args.artifact,
        preset,
        Path(args.out or default),
        dry_run=args.dry_run,
        command="difflora " + " ".join(args.argv),
        progress=not args.no_progress,
    )


def _add_lm_eval_parser(commands) -> None:
    # listed in --help only: main() hands `difflora lm-eval ARGS` to lm-eval before argparse
    commands.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the difflora_jax model registered (--model difflora_jax)",
    )


def _lm_eval(harness_args: Sequence[str]) -> None:
    """lm-eval's own command line with ``harness_args`` (``difflora lm-eval ARGS``: argparse
    does not see them, so every lm_eval option passes through untouched)."""
    # start-up time (module docstring); importing the plug-in registers the model
    from lm_eval.__main__ import cli_evaluate

    import difflora_jax.evaluation.lm_eval_model  # noqa: F401

    saved = sys.argv
    sys.argv = ["lm_eval", *harness_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def _add_plan_parser(commands) -> None:
    p = commands.add_parser(
        "plan",
        help="per-device memory and FLOPs of a sharded train step, compiled without weights",
    )
    p.add_argument("--model", required=True, help="a model shape name (llama-3.1-8b)")
    p.add_argument("--method", default="difflora-32", help="a method name or YAML")
    p.add_argument(
        "--mesh",
        type=_mesh_arg,
        default={},
        help="AXIS=SIZE,... over data, fsdp, tensor (unset axes: data=-1, others 1)",
    )
    p.add_argument("--devices", type=_positive_int, required=True, help="devices of the mesh")
    p.add_argument("--batch", type=_positive_int, required=True, help="global batch (rows)")
    p.add_argument("--seq-len", type=_positive_int, required=True)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--remat", choices=REMAT_POLICIES, default="none")
    p.add_argument("--grad-accum-steps", type=_positive_int, default=1)
    p.add_argument("--device-memory", help="memory of one device (16GiB, 80GB): says if it fits")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _plan(args: argparse.Namespace) -> None:
    from difflora_jax.training import plan  # start-up time (module docstring)

    if os.environ.get(plan.CHILD_ENV) != "1":
        status = plan.in_subprocess(args.argv, args.devices)
        if status:
            raise SystemExit(status)
        return
    from difflora_jax.parallel import MeshConfig  # start-up time

    mesh = MeshConfig(**{"data": -1, "fsdp": 1, "tensor": 1, **args.mesh})
    memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    result = plan.plan(
        args.model,
        args.method,
        mesh=mesh,
        batch=args.batch,
        seq_len=args.seq_len,
        dtype=args.dtype,
        remat=args.remat,
        grad_accum_steps=args.grad_accum_steps,
        device_memory=memory,
    )
    print(json.dumps(result) if args.json else plan.render(result))


def _bench(args: argparse.Namespace) -> None:
    from difflora_jax.bench import generate, train  # start-up time (module docstring)
    from difflora_jax.bench.report import write_section  # start-up time

    if args.kind == "train":
        args.methods = [m for m in args.methods.split(",") if m]
        args.shapes = [(args.batch, args.seq_len), *args.shapes]
        # (scan, stacked adapters) of our runners per method
        args.layouts = [(True, True)]
        args.layouts += [(True, False)] if args.also_per_layer else []
        args.layouts += [(False, False)] if args.also_unrolled else []
        section = train.run(args)
    else:
        section = generate.run(args)
    print(section)
    if args.write:
        suffix = f"-{args.section}" if args.section else ""
        write_section(Path(args.write), f"bench-{args.kind}{suffix}", section)


def _export(args: argparse.Namespace) -> None:
    from difflora_jax.weights.export import export_adapter  # start-up time (module docstring)

    out = export_adapter(args.adapter, args.out, args.format, model=args.model)
    print(json.dumps({"format": args.format, "out": str(out)}))


def _import(args: argparse.Namespace) -> None:
    from difflora_jax.weights.export import import_adapter  # start-up time (module docstring)

    out = import_adapter(args.path, args.out, args.format, model=args.model)
    print(json.dumps({"format": args.format, "checkpoint": str(out)}))


def _generate(args: argparse.Namespace) -> None:
    # start-up time (module docstring)
    from difflora_jax.generation import generate
    from difflora_jax.weights.loading import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    outputs = generate(
        model,
        tokenizer,
        list(args.prompt),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
    )
    for prompt, out in zip(args.prompt, outputs):
        if args.json:
            record = {"prompt": prompt, "text": out.text, "finish_reason": out.finish_reason}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(out.text)


def _info(args: argparse.Namespace) -> None:
    # start-up time (module docstring)
    from difflora_jax.config import to_dict
    from difflora_jax.weights.loading import load_model

    model, _ = load_model(args.model, dtype=args.dtype, with_tokenizer=False)
    record = to_dict(model.config)
    record["rope_freq_factors"] = record["rope_freq_factors"] and len(record["rope_freq_factors"])
    record["num_params"] = model.config.num_params
    print(json.dumps(record, indent=2))


def _params(args: argparse.Namespace) -> None:
    # start-up time (module docstring)
    from difflora_jax.catalog import PAPER_VARIANTS, load_method
    from difflora_jax.modeling.adapters import trainable_params_per_layer
    from difflora_jax.weights.loading import read_model_config

    config = read_model_config(args.model)
    names = args.method or list(PAPER_VARIANTS)
    rows = []
    for name in names:
        counts = trainable_params_per_layer(config, load_method(name))
        rows.append({"method": name, "per_layer": counts, "total": sum(counts.values())})
    if args.json:
        for row in rows:
            row["per_layer"] = [row["per_layer"][i] for i in sorted(row["per_layer"])]
        print(json.dumps({"model": args.model, "base_params": config.num_params, "methods": rows}))
        return
    print(
        f"Trainable parameters on {args.model} ({config.num_layers} layers, "
        f"{config.num_params:,} base parameters)"
    )
    width = max(len(r["method"]) for r in rows) + 2
    print(f"{'method':<{width}}{'per layer':>14}{'total':>14}{'% of base':>11}")
    for row in rows:
        values = set(row["per_layer"].values())
        per_layer = f"{values.pop():,}" if len(values) == 1 else "varies"
        share = 100 * row["total"] / config.num_params
        print(f"{row['method']:<{width}}{per_layer:>14}{row['total']:>14,}{share:>10.3f}%")
        if args.per_layer:
            for i, n in sorted(row["per_layer"].items()):
                print(f"{'':<{width}}  layer {i:>3}: {n:,}")


def _train(args: argparse.Namespace) -> None:
    from difflora_jax.parallel import initialize_distributed, is_main_process  # start-up time
    from difflora_jax.training import load_train_config, train  # start-up time (docstring)

    config = load_train_config(args.config, args.overrides)
    config.validate()  # before joining other processes: a bad config fails alone and at once
    initialize_distributed(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        local_device_count=args.local_devices,
    )
    result = train(config, resume=args.resume, progress=not args.no_progress)
    last = result.metrics[-1] if result.metrics else {}
    if is_main_process():
        print(
            json.dumps(
                {"run_dir": str(result.run_dir), "step": result.step, "loss": last.get("loss")}
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # before anything starts JAX (see difflora_jax/host_memory.py)
    if argv[:1] == ["lm-eval"]:
        _lm_eval(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    args.argv = argv
    run = {
        "generate": _generate,
        "info": _info,
        "params": _params,
        "train": _train,
        "export": _export,
        "import": _import,
        "bench": _bench,
        "plan": _plan,
        "eval": _eval,
        "reproduce": _reproduce,
    }
    try:
        run[args.command](args)
    except DiffLoRAError as e:
        print(f"difflora: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

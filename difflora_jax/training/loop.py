"""``train(config)``: load the base model, add adapters, run the jitted steps, log, checkpoint,
resume.

A run directory holds ``config.yaml`` (the run's TrainConfig with the method inlined),
``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/<step>/``. A new run never writes into a
non-empty directory; ``resume=True`` continues from the latest checkpoint there (same adapters,
optimizer state, dropout RNG state and data position, so the losses equal an uninterrupted
run's), or starts the run when the directory is absent or empty (so a preemptible job can
always pass it). A newest checkpoint whose files are unreadable is moved, unchanged, to
``corrupt_checkpoints/<step>`` (named on stderr) and the run resumes from the newest one that
reads cleanly.

``train`` reads as its three parts: ``_prepare`` (model, adapters, data, optimizer; nothing
written yet), ``_resume`` (the checkpoint to continue from) and ``_run_steps`` (step, record,
checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from difflora_jax.adapter_checkpoint import (
    Checkpointer,
    CorruptCheckpointError,
    base_model_record,
    check_fits,
)
from difflora_jax.config import AdapterConfig, load_yaml, save_yaml, to_dict
from difflora_jax.errors import CheckpointError, ConfigError, DiffLoRAError
from difflora_jax.losses import BATCH_KEYS
from difflora_jax.modeling.adapters import apply_adapters, lambda_layers, write_back
from difflora_jax.modeling.dropout import set_mask_generator
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.parallel import Rules, is_main_process, make_mesh, make_rules
from difflora_jax.parallel.shard import (
    batch_sharding,
    batch_split,
    global_batch,
    init_optimizer,
    local_rows,
    shard_model,
)
from difflora_jax.protocols import Tokenizer
from difflora_jax.training.batches import build_batches
from difflora_jax.training.config import (
    DROPOUT_PRNGS,
    RESUMABLE_CHANGES,
    OptimizerConfig,
    TrainConfig,
)
from difflora_jax.training.layout import scanned_runs, to_per_layer, to_stacked
from difflora_jax.training.metrics import MetricsLogger
from difflora_jax.training.optimizer import learning_rate, make_optimizer
from difflora_jax.training.step import ShardedStep, split_for_training
from difflora_jax.weights.loading import load_model

RUN_CONFIG = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


class TrainingError(DiffLoRAError, RuntimeError):
    """A run cannot go on (a non-finite loss, a batch that does not fit the model)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss or gradient norm of a step is NaN or inf; the run stopped before applying it."""


@dataclasses.dataclass
class TrainState:
    """What the loop carries between steps; a ``step_callback`` may replace its fields.

    ``params``, ``opt_state`` and ``rng`` are in the step's stacked layout
    (``training.layout``: each scanned run of layers under ``"layer_runs"``);
    ``training.layout.to_per_layer`` gives the per-layer view that checkpoints and
    ``write_back`` take."""

    step: int
    params: dict
    opt_state: Any
    rng: dict


@dataclasses.dataclass
class TrainResult:
    model: LlamaForCausalLM  # the base model with the trained adapters
    tokenizer: Tokenizer | None
    run_dir: Path
    step: int
    metrics: list[dict[str, Any]]  # the records this call logged
    resumed_from: int | None


def reseed_dropout(model: nnx.Module, seed: int, impl: str = DROPOUT_PRNGS[0]) -> None:
    """Give every dropout stream of ``model`` its own key derived from ``seed`` (count 0) and
    draw masks with generator ``impl`` (``TrainConfig.dropout_prng``: ``hash`` uses
    threefry2x32 keys and the counter-hash masks of ``modeling.dropout``)."""
    set_mask_generator(model, "hash" if impl == "hash" else "bernoulli")
    keys = nnx.state(model, nnx.RngKey)
    if not jax.tree.leaves(keys):
        return
    pure = nnx.to_pure_dict(keys)
    base = jax.random.key(seed, impl="threefry2x32" if impl == "hash" else impl)
    leaves, treedef = jax.tree.flatten(pure)
    fresh = [jax.random.fold_in(base, i) for i in range(len(leaves))]
    nnx.replace_by_pure_dict(keys, jax.tree.unflatten(treedef, fresh))
    nnx.update(model, keys)
    counts = nnx.state(model, nnx.RngCount)
    nnx.update(model, jax.tree.map(lambda c: c * 0, counts))


def _resolved(config: TrainConfig, adapter: AdapterConfig) -> TrainConfig:
    return dataclasses.replace(config, method=to_dict(adapter))


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    tmp = run_dir / f".{RUN_CONFIG}.tmp"
    save_yaml(config, tmp)
    os.replace(tmp, run_dir / RUN_CONFIG)


def _check_run_dir(run_dir: Path, config: TrainConfig, resume: bool) -> None:
    """Errors for a run directory this run must not write into (checked before any work)."""
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not resume and entries:
        raise ConfigError(
            f"output_dir {run_dir} is not empty (holds {entries[:5]}); a new run never "
            "overwrites a directory: choose another output_dir, or continue that run with "
            "--resume (resume=True)"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a directory")
    saved_path = run_dir / RUN_CONFIG
    if resume and saved_path.is_file():
        try:
            saved = load_yaml(TrainConfig, saved_path)
        except ConfigError as e:
            raise ConfigError(f"cannot resume: {saved_path} is invalid: {e}") from e
        differ = [
            f.name
            for f in dataclasses.fields(TrainConfig)
            if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name)
        ]
        if differ:
            details = "; ".join(
                f"{name}: {getattr(saved, name)!r} -> {getattr(config, name)!r}" for name in differ
            )
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the run's {RUN_CONFIG} in "
                f"{differ} ({details}); only {list(RESUMABLE_CHANGES)} may change on resume"
            )
    elif resume and entries:
        raise ConfigError(
            f"cannot resume {run_dir}: it holds no {RUN_CONFIG}, so it is not a run directory"
        )


def _check_batch(batch: dict, step: int, shape: tuple[int, int], vocab_size: int) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise TrainingError(f"batch of step {step} lacks {missing}")
    for key in BATCH_KEYS:
        if tuple(np.shape(batch[key])) != shape:
            raise TrainingError(
                f"batch of step {step}: {key} has shape {tuple(np.shape(batch[key]))}, "
                f"expected {shape} (batch_size, data.max_length)"
            )
    top = int(np.max(batch["input_ids"])) if np.size(batch["input_ids"]) else 0
    if top >= vocab_size or int(np.min(batch["input_ids"])) < 0:
        raise TrainingError(
            f"batch of step {step} holds token id {top}, outside the model's vocabulary "
            f"(vocab_size {vocab_size}): does the tokenizer belong to this model?"
        )


@dataclasses.dataclass
class _Run:
    """Everything a run needs before it writes anything."""

    config: TrainConfig
    run_config: TrainConfig  # with the method inlined: what config.yaml records
    run_dir: Path
    model: LlamaForCausalLM
    tokenizer: Tokenizer | None
    adapter_config: AdapterConfig
    base_record: dict
    batches: Iterator[dict]
    optimizer: OptimizerConfig
    graphdef: nnx.GraphDef
    rest: dict
    layers: tuple[int, ...]
    mesh: Mesh
    step_fn: ShardedStep


def _prepare(
    config: TrainConfig,
    resume: bool,
    model: LlamaForCausalLM | None,
    tokenizer: Tokenizer | None,
    batches: Iterator[dict] | None,
) -> tuple[_Run, TrainState]:
    """Validate, load the base model, add adapters, build the data and the optimizer state."""
    config.validate()
    adapter_config = config.adapter_config()
    run_config = _resolved(config, adapter_config)
    run_dir = Path(config.output_dir).expanduser().absolute()
    _check_run_dir(run_dir, run_config, resume)
    mesh = make_mesh(config.mesh)
    rules = make_rules(config.sharding_rules)
    _check_batch_divides(config, mesh, rules)
    if model is None:  # read straight into shards
        model, loaded = load_model(
            config.model,
            dtype=config.dtype,
            attention_backend=config.attention_backend,
            mesh=mesh,
            rules=rules,
        )
        tokenizer = loaded if tokenizer is None else tokenizer
    if getattr(model, "adapter_config", None) is None:
        apply_adapters(model, adapter_config)
    elif model.adapter_config != adapter_config:
        raise ConfigError(
            f"the model already carries adapters {model.adapter_config}, not the config's "
            f"method {adapter_config}"
        )
    reseed_dropout(model, config.seed, config.dropout_prng)
    model.set_layer_execution(scan=config.scan_layers, remat=config.remat)
    shard_model(model, mesh, rules)  # the adapters (and a model passed in)
    if batches is None:
        shape = (config.batch_size, config.data.max_length)
        batches = build_batches(
            config.data,
            tokenizer,
            batch_size=config.batch_size,
            vocab_size=model.config.vocab_size,
            rows=local_rows(batch_sharding(mesh, rules), shape),  # read with data.streams > 1
        )
    optimizer = config.optimizer_config()
    graphdef, params, rng, rest = split_for_training(model)
    params, rng = to_stacked((params, rng), scanned_runs(model))
    opt_state = init_optimizer(make_optimizer(optimizer), params, mesh)
    step_fn = ShardedStep(
        graphdef,
        optimizer,
        config.grad_accum_steps,
        mesh,
        rules,
        params=params,
        opt_state=opt_state,
        rng=rng,
        rest=rest,
    )
    run = _Run(
        config=config,
        run_config=run_config,
        run_dir=run_dir,
        model=model,
        tokenizer=tokenizer,
        adapter_config=adapter_config,
        base_record=base_model_record(model, config.model),
        batches=batches,
        optimizer=optimizer,
        graphdef=graphdef,
        rest=rest,
        layers=lambda_layers(model),
        mesh=mesh,
        step_fn=step_fn,
    )
    return run, TrainState(0, params, opt_state, rng)


def _check_batch_divides(config: TrainConfig, mesh: Mesh, rules: Rules) -> None:
    """The global batch (and each micro-batch) must split evenly over the batch's mesh axes."""
    axes, devices = batch_split(mesh, rules)
    micro = config.batch_size // config.grad_accum_steps
    if micro % devices:
        raise ConfigError(
            f"batch_size {config.batch_size} (micro-batches of {micro} rows with "
            f"grad_accum_steps {config.grad_accum_steps}) does not split over mesh axes "
            f"{'x'.join(axes)} ({devices} devices): make the micro-batch a multiple of {devices}"
        )


def _set_aside(checkpointer: Checkpointer, run_dir: Path, step: int, error: Exception) -> None:
    """Move an unreadable checkpoint, unchanged, out of Orbax's directory (where it would be
    garbage-collected or collide with the next save of its step), saying so on stderr."""
    source = checkpointer.step_dir(step)
    target = run_dir / CORRUPT_DIR / str(step)
    if target.exists():
        target = target.with_name(f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    target.parent.mkdir(exist_ok=True)
    shutil.move(str(source), str(target))
    print(
        f"difflora: warning: {error}; moved it unchanged to {target} and trying the next "
        "older checkpoint",
        file=sys.stderr,
    )


def _resume(checkpointer: Checkpointer, run: _Run, state: TrainState) -> int | None:
    """Restore ``state`` (and the data position) from the newest checkpoint that reads cleanly;
    returns its step, or None when there is none (a fresh start)."""
    steps = checkpointer.steps()
    for step in reversed(steps):
        where = f"checkpoint {checkpointer.step_dir(step)}"
        try:
            meta = checkpointer.read_meta(step)
            check_fits(meta, run.model, where, source=run.config.model)
            # checkpoints hold the per-layer layout
            params, opt_state, rng = to_per_layer((state.params, state.opt_state, state.rng))
            restored = checkpointer.restore(step, params=params, opt_state=opt_state, rng=rng)
        except CorruptCheckpointError as e:
            _set_aside(checkpointer, run.run_dir, step, e)
            continue
        assert restored.rng is not None  # restore returns the rng template it was given
        state.params, state.opt_state, state.rng = to_stacked(
            (restored.params, restored.opt_state, restored.rng), scanned_runs(run.model)
        )
        state.step = restored.step
        data_state = meta.get("data_state")
        if data_state is not None:
            if not hasattr(run.batches, "restore"):
                raise CheckpointError(
                    f"{where} records a data position, but the batch iterator cannot restore one"
                )
            run.batches.restore(data_state)  # type: ignore[attr-defined]
        return state.step
    if steps:
        raise CheckpointError(
            f"cannot resume {run.run_dir}: none of its checkpoints {steps} is readable (moved "
            f"to {run.run_dir / CORRUPT_DIR})"
        )
    return None


def _record(run: _Run, step: int, metrics: dict, elapsed: float) -> dict[str, Any]:
    """The logged record of one applied step."""
    return {
        "loss": float(metrics["loss"]),
        "lr": learning_rate(run.optimizer, step),
        "grad_norm": float(metrics["grad_norm"]),
        "tokens": int(metrics["tokens"]),
        "input_tokens": int(metrics["input_tokens"]),
        "tokens_per_s": float(metrics["input_tokens"]) / max(elapsed, 1e-9),
        "step_time_s": elapsed,
        "lambda": {str(i): float(v) for i, v in zip(run.layers, metrics["lambda"])},
    }


def _non_finite(checkpointer: Checkpointer, step: int, metrics: dict) -> NonFiniteLossError:
    checkpointer.wait()
    last = checkpointer.latest_step()
    kept = (
        f"the last good checkpoint is step {last} ({checkpointer.step_dir(last)})"
        if last is not None
        else "no checkpoint was written yet"
    )
    return NonFiniteLossError(
        f"non-finite loss at step {step}: loss={float(metrics['loss'])}, "
        f"grad_norm={float(metrics['grad_norm'])}; the run stopped without applying this "
        f"update, and {kept}"
    )


def _save(checkpointer: Checkpointer, run: _Run, state: TrainState, record: dict) -> None:
    batches = run.batches
    params, opt_state, rng = to_per_layer((state.params, state.opt_state, state.rng))
    checkpointer.save(
        state.step,
        params=params,
        opt_state=opt_state,
        rng=rng,
        meta={
            "data_state": batches.state() if hasattr(batches, "state") else None,  # type: ignore[attr-defined]
            "adapter_config": to_dict(run.adapter_config),
            "base_model": run.base_record,
            "train_config": to_dict(run.run_config),
            "metrics": record,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def _run_steps(
    run: _Run,
    state: TrainState,
    checkpointer: Checkpointer,
    logger: MetricsLogger | None,
    bar: tqdm,
    step_callback: Callable[[TrainState, dict], None] | None,
) -> list[dict[str, Any]]:
    """Steps until ``max_steps``: train, check, log, checkpoint; returns the logged records."""
    config = run.config
    shape = (config.batch_size, config.data.max_length)
    # streamed data (data.streams > 1) yields only this process's rows of each batch
    rows: slice | None = getattr(run.batches, "local_rows", None)
    expected = shape if rows is None else (rows.stop - rows.start, shape[1])
    logged: list[dict[str, Any]] = []
    while state.step < config.max_steps:
        start = time.perf_counter()
        batch = next(run.batches)
        _check_batch(batch, state.step + 1, expected, run.model.config.vocab_size)
        arrays = {k: np.asarray(batch[k], np.int32) for k in BATCH_KEYS}
        params, opt_state, rng, metrics = run.step_fn(
            state.params,
            state.opt_state,
            state.rng,
            run.rest,
            global_batch(arrays, run.step_fn.batch_sharding, global_rows=shape[0]),
        )
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - start
        if not metrics["finite"]:
            raise _non_finite(checkpointer, state.step + 1, metrics)
        state.step += 1
        state.params, state.opt_state, state.rng = params, opt_state, rng
        record = _record(run, state.step, metrics, elapsed)
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            if logger is not None:
                logger.log(state.step, record)
            logged.append({"step": state.step, **record})
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if state.step % config.save_every == 0 or state.step == config.max_steps:
            _save(checkpointer, run, state, record)
        if step_callback is not None:
            step_callback(state, record)
    return logged


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    model: LlamaForCausalLM | None = None,
    tokenizer: Tokenizer | None = None,
    batches: Iterator[dict] | None = None,
    step_callback: Callable[[TrainState, dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train adapters as ``config`` says; see the module docstring for the run directory.

    ``model`` / ``tokenizer``: an already loaded base model (without adapters, or with the
    config's) instead of loading ``config.model``. ``batches``: an iterator of batches instead of
    ``config.data`` (resumable when it has ``state()`` / ``restore()``). ``step_callback(state,
    record)`` runs after every step (and its checkpoint); it may replace ``state``'s fields or
    raise to stop the run. A NaN/inf loss raises NonFiniteLossError naming the step; the step is
    not applied and the checkpoints already written stay as they are.
    """
    run, state = _prepare(config, resume, model, tokenizer, batches)
    main = is_main_process()
    # every process has checked the run directory before any of them writes to it
    _sync("difflora-train-checked")
    # Only now, with model and data ready, does the run directory get written.
    if main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run.run_dir, run.run_config)
    _sync("difflora-train-dir")
    checkpointer = Checkpointer(run.run_dir / CHECKPOINT_DIR, keep=config.keep_checkpoints)
    logger = bar = None
    try:
        resumed_from = _resume(checkpointer, run, state) if resume else None
        # metrics, TensorBoard and the progress bar: process 0 only
        logger = MetricsLogger(run.run_dir, state.step) if main else None
        bar = tqdm(
            total=config.max_steps,
            initial=state.step,
            desc="train",
            unit="step",
            disable=not progress or not main,
            dynamic_ncols=True,
        )
        logged = _run_steps(run, state, checkpointer, logger, bar, step_callback)
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()
        if bar is not None:
            bar.close()
    write_back(run.model, *to_per_layer((state.params, state.rng)))
    return TrainResult(
        model=run.model,
        tokenizer=run.tokenizer,
        run_dir=run.run_dir,
        step=state.step,
        metrics=logged,
        resumed_from=resumed_from,
    )

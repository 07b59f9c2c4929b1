"""``train(config)``: load the base model, add adapters, run the jitted steps, log, checkpoint,
resume.

A run directory holds ``config.yaml`` (the run's TrainConfig with the method inlined),
``metrics.jsonl``, ``tensorboard/`` and ``checkpoints/<step>/``. A new run never writes into a
non-empty directory; ``resume=True`` continues from the latest checkpoint there (same adapters,
optimizer state, dropout RNG state and data position, so the losses equal an uninterrupted
run's), or starts the run when the directory is absent or empty (so a preemptible job can
always pass it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from difflora_jax.config import (
    RESUMABLE_CHANGES,
    AdapterConfig,
    TrainConfig,
    from_dict,
    load_yaml,
    save_yaml,
    to_dict,
)
from difflora_jax.errors import CheckpointError, ConfigError, DiffLoRAError
from difflora_jax.modeling.adapters import apply_adapters
from difflora_jax.training.batches import build_batches
from difflora_jax.training.checkpoint import Checkpointer, base_model_record, check_base_model
from difflora_jax.training.metrics import MetricsLogger
from difflora_jax.training.optimizer import learning_rate, make_optimizer
from difflora_jax.training.step import (
    BATCH_KEYS,
    lambda_layers,
    split_for_training,
    train_step,
    write_back,
)

RUN_CONFIG = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


class TrainingError(DiffLoRAError, RuntimeError):
    """A run cannot go on (a non-finite loss, a batch that does not fit the model)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The loss or gradient norm of a step is NaN or inf; the run stopped before applying it."""


@dataclasses.dataclass
class TrainState:
    """What the loop carries between steps; a ``step_callback`` may replace its fields."""

    step: int
    params: dict
    opt_state: Any
    rng: dict


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module  # the base model with the trained adapters
    tokenizer: Any
    run_dir: Path
    step: int
    metrics: list[dict[str, Any]]  # the records this call logged
    resumed_from: int | None


# Dropout keys use the "rbg" generator: its random bits cost a fraction of threefry's on CPU and
# GPU (a train step with adapter dropout 0.1 spends most of its extra time drawing masks).
DROPOUT_PRNG = "rbg"


def reseed_dropout(model: nnx.Module, seed: int) -> None:
    """Give every dropout stream of ``model`` its own key derived from ``seed`` (count 0)."""
    keys = nnx.state(model, nnx.RngKey)
    if not jax.tree.leaves(keys):
        return
    pure = nnx.to_pure_dict(keys)
    base = jax.random.key(seed, impl=DROPOUT_PRNG)
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


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    model: nnx.Module | None = None,
    tokenizer: Any = None,
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
    config.validate()
    adapter_config = config.adapter_config()
    run_config = _resolved(config, adapter_config)
    run_dir = Path(config.output_dir).expanduser().absolute()
    _check_run_dir(run_dir, run_config, resume)

    if model is None:
        from difflora_jax.weights.loading import load_model

        model, loaded = load_model(
            config.model, dtype=config.dtype, attention_backend=config.attention_backend
        )
        tokenizer = loaded if tokenizer is None else tokenizer
    if getattr(model, "adapter_config", None) is None:
        apply_adapters(model, adapter_config)
    elif model.adapter_config != adapter_config:
        raise ConfigError(
            f"the model already carries adapters {model.adapter_config}, not the config's "
            f"method {adapter_config}"
        )
    reseed_dropout(model, config.seed)
    base_record = base_model_record(model, config.model)
    if batches is None:
        batches = build_batches(
            config.data,
            tokenizer,
            batch_size=config.batch_size,
            vocab_size=model.config.vocab_size,
        )
    optimizer = config.optimizer_config()
    graphdef, params, rng, rest = split_for_training(model)
    opt_state = make_optimizer(optimizer).init(params)
    layers = lambda_layers(model)
    shape = (config.batch_size, config.data.max_length)

    # Only now, with model and data ready, does the run directory get written.
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, run_config)
    checkpointer = Checkpointer(run_dir / CHECKPOINT_DIR, keep=config.keep_checkpoints)
    logger = bar = None
    step = 0
    resumed_from = None
    logged: list[dict[str, Any]] = []
    try:
        latest = checkpointer.latest_step() if resume else None
        if latest is not None:
            where = f"checkpoint {checkpointer.step_dir(latest)}"
            meta = checkpointer.read_meta(latest)
            check_base_model(meta["base_model"], model, where, source=config.model)
            saved_adapter = from_dict(AdapterConfig, meta["adapter_config"])
            if saved_adapter != adapter_config:
                raise CheckpointError(
                    f"{where} holds adapters of {saved_adapter}, not the config's {adapter_config}"
                )
            restored = checkpointer.restore(latest, params=params, opt_state=opt_state, rng=rng)
            params, opt_state, rng = restored.params, restored.opt_state, restored.rng
            step = resumed_from = restored.step
            data_state = meta.get("data_state")
            if data_state is not None:
                if not hasattr(batches, "restore"):
                    raise CheckpointError(
                        f"{where} records a data position, but the batch iterator cannot "
                        "restore one"
                    )
                batches.restore(data_state)
        logger = MetricsLogger(run_dir, step)
        bar = tqdm(
            total=config.max_steps,
            initial=step,
            desc="train",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )
        while step < config.max_steps:
            start = time.perf_counter()
            batch = next(batches)
            _check_batch(batch, step + 1, shape, model.config.vocab_size)
            new_params, new_opt_state, new_rng, metrics = train_step(
                graphdef,
                params,
                opt_state,
                rng,
                rest,
                batch,
                optimizer=optimizer,
                grad_accum_steps=config.grad_accum_steps,
            )
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - start
            step += 1
            if not metrics["finite"]:
                checkpointer.wait()
                last = checkpointer.latest_step()
                kept = (
                    f"the last good checkpoint is step {last} ({checkpointer.step_dir(last)})"
                    if last is not None
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}: loss={float(metrics['loss'])}, "
                    f"grad_norm={float(metrics['grad_norm'])}; the run stopped without applying "
                    f"this update, and {kept}"
                )
            params, opt_state, rng = new_params, new_opt_state, new_rng
            record = {
                "loss": float(metrics["loss"]),
                "lr": learning_rate(optimizer, step),
                "grad_norm": float(metrics["grad_norm"]),
                "tokens": int(metrics["tokens"]),
                "input_tokens": int(metrics["input_tokens"]),
                "tokens_per_s": float(metrics["input_tokens"]) / max(elapsed, 1e-9),
                "step_time_s": elapsed,
                "lambda": {str(i): float(v) for i, v in zip(layers, metrics["lambda"])},
            }
            if step % config.log_every == 0 or step == config.max_steps:
                logger.log(step, record)
                logged.append({"step": step, **record})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            if step % config.save_every == 0 or step == config.max_steps:
                checkpointer.save(
                    step,
                    params=params,
                    opt_state=opt_state,
                    rng=rng,
                    meta={
                        "data_state": batches.state() if hasattr(batches, "state") else None,
                        "adapter_config": to_dict(adapter_config),
                        "base_model": base_record,
                        "train_config": to_dict(run_config),
                        "metrics": record,
                        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
            if step_callback is not None:
                state = TrainState(step, params, opt_state, rng)
                step_callback(state, record)
                params, opt_state, rng = state.params, state.opt_state, state.rng
    finally:
        checkpointer.close()
        if logger is not None:
            logger.close()
        if bar is not None:
            bar.close()
    write_back(model, params, rng)
    return TrainResult(
        model=model,
        tokenizer=tokenizer,
        run_dir=run_dir,
        step=step,
        metrics=logged,
        resumed_from=resumed_from,
    )

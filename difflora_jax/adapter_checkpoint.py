"""Adapter checkpoints with Orbax: adapters, optionally the optimizer and dropout RNG state,
step, data position, the AdapterConfig and a record of the base model. Never the base weights.

Below training on purpose: loading trained adapters for inference (``load_adapter``,
``load_model(base, adapter=DIR)``), exporting and importing them need no training code.

A checkpoint is one Orbax step directory ``<dir>/<step>/`` with up to four items::

    adapters/    the AdapterParam arrays, flat {"layers.3.attn.negative_q.a": float32 array}
    optimizer/   the optax state, flat {"1.0.mu.layers.3.attn.negative_q.a": array} (training
                 checkpoints; absent in imported adapters, which cannot resume a run)
    rng/         dropout RNG streams, keys as uint32 key data (absent without dropout)
    meta/        JSON: format, step, data_state, adapter_config, base_model, train_config

Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so
a run killed mid-save leaves at most a temporary directory, which is never listed as a step.
Saves are asynchronous (the arrays are copied off the device before ``save`` returns).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from difflora_jax.config import AdapterConfig, ModelConfig, from_dict, to_dict
from difflora_jax.errors import CheckpointError, ConfigError
from difflora_jax.modeling.adapters import (
    abstract_adapted_model,
    adapter_arrays,
    apply_adapters,
    write_back,
)
from difflora_jax.modeling.llama import LlamaForCausalLM
from difflora_jax.parallel import DEFAULT_RULES, Rules
from difflora_jax.parallel.shard import shard_model


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's files are unreadable or incomplete (as opposed to readable but meant for
    another model); a resumed run falls back to an older checkpoint on this error only."""


def _silence_abandoned_reads() -> None:
    """Drop the late ``RuntimeError: Event loop is closed`` reports of reads Orbax abandoned.

    Orbax runs each read in a fresh event loop and closes it as soon as one array fails; the
    other arrays' TensorStore reads finish later and try to wake that closed loop, and Python
    prints each as an unraisable exception (dozens of tracebacks around a clear error). Installed
    once, by the first Checkpointer (the reports can arrive before the error is even raised);
    every other unraisable exception still goes to the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_difflora_jax", False):
        return

    def hook(report: Any) -> None:
        value, tb = report.exc_value, report.exc_traceback
        last = traceback.extract_tb(tb)[-1] if tb is not None else None
        if (
            isinstance(value, RuntimeError)
            and str(value) == "Event loop is closed"
            and last is not None
            and last.name in ("call_soon_threadsafe", "_check_closed")
        ):
            return
        previous(report)

    hook._difflora_jax = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


FORMAT_VERSION = 1
ARRAY_ITEMS = ("adapters", "optimizer", "rng")
META_ITEM = "meta"
# ModelConfig fields that must match for adapters to fit a base model (the rest, e.g. the name
# or special token ids, may differ between two copies of the same weights).
BASE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_freq_factors",
    "tie_word_embeddings",
)
_FINGERPRINT_SAMPLES = 512
_STEP_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")


# ---------------------------------------------------------------------------------------------
# pytrees <-> flat {dotted path: array} dicts


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flatten(tree: Any) -> dict[str, Any]:
    """``{"layers.0.attn.q_proj.lora.a": leaf, ...}`` for any pytree (dicts, lists, NamedTuples)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        name = ".".join(_key_name(k) for k in path) or "value"
        if name in flat:
            raise ValueError(f"two leaves flatten to the same name {name!r}")
        flat[name] = leaf
    return flat


def unflatten_like(template: Any, flat: Mapping[str, Any], what: str) -> Any:
    """The pytree of ``template``'s structure holding ``flat``'s arrays (checked by name, shape
    and dtype; key arrays in the template are rebuilt from their saved key data)."""
    names = flatten(template)
    _check_names(names, flat, what)
    leaves = []
    for name, like in names.items():
        value = flat[name]
        if _is_key(like):
            value = jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(like))
        leaves.append(value)
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def _short(error: Exception, limit: int = 400) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _check_names(expected: Mapping[str, Any], found: Mapping[str, Any], what: str) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{what} does not match this model: missing {len(missing)} entr(ies) "
            f"{missing[:4]}, unexpected {len(extra)} {extra[:4]} (was it saved for another "
            "adapter method or model?)"
        )
    for name, like in expected.items():
        like_shape = tuple(jax.random.key_data(like).shape if _is_key(like) else like.shape)
        shape = tuple(found[name].shape)
        if shape != like_shape:
            raise CheckpointError(
                f"{what}: {name!r} has shape {shape} in the checkpoint, but this model needs "
                f"{like_shape}"
            )


def _abstract(flat: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    def one(x):
        x = jax.random.key_data(x) if _is_key(x) else x
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return {name: one(x) for name, x in flat.items()}


# ---------------------------------------------------------------------------------------------
# the base-model record


def _samples(tree: dict) -> dict:
    def sample(x):
        flat = jnp.ravel(x)
        stride = max(1, flat.size // _FINGERPRINT_SAMPLES)
        return flat[::stride][:_FINGERPRINT_SAMPLES].astype(jnp.bfloat16)

    return jax.tree.map(sample, tree)


_samples_jit = jax.jit(_samples)


def model_fingerprint(model: nnx.Module) -> str:
    """A sha256 over every base parameter's path and shape plus a strided sample of its values
    rounded to bfloat16, so the same weights loaded as float32 or bfloat16 agree."""
    params = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    samples = jax.device_get(_samples_jit(params))
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(f"{name}:{tuple(params[name].shape)}\n".encode())
        digest.update(np.asarray(samples[name]).view(np.uint16).tobytes())
    return digest.hexdigest()


def base_model_record(model: LlamaForCausalLM, source: str | os.PathLike | None = None) -> dict:
    """What the adapters were trained on: source, name, ModelConfig, dtype, fingerprint."""
    config: ModelConfig = model.config
    params = nnx.state(model, nnx.Param)
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})
    return {
        "source": None if source is None else str(source),
        "name": config.name,
        "config": to_dict(config),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "fingerprint": model_fingerprint(model),
    }


def _describe(record: Mapping[str, Any]) -> str:
    name = record.get("source") or record.get("name") or "an unnamed model"
    return f"{name} (fingerprint {str(record.get('fingerprint'))[:12]})"


def check_base_model(
    record: Mapping[str, Any], model: LlamaForCausalLM, where: str, source: str | None = None
) -> None:
    """CheckpointError unless ``model`` is the base model ``record`` describes."""
    saved = record.get("config") or {}
    current = to_dict(model.config)
    this = {"source": source, "name": model.config.name}
    differ = [f for f in BASE_FIELDS if saved.get(f) != current.get(f)]
    if differ:
        details = ", ".join(f"{f}: {saved.get(f)!r} vs {current.get(f)!r}" for f in differ)
        raise CheckpointError(
            f"{where} was trained on base model {_describe(record)}, but this model "
            f"({source or model.config.name or 'unnamed'}) has a different configuration: "
            f"{details} (checkpoint vs this model)"
        )
    fingerprint = model_fingerprint(model)
    if fingerprint != record.get("fingerprint"):
        this["fingerprint"] = fingerprint
        raise CheckpointError(
            f"{where} was trained on base model {_describe(record)}, but this model "
            f"{_describe(this)} has the same configuration and different weights; load the "
            "base model the adapters were trained on (or pass check_base=False)"
        )


# ---------------------------------------------------------------------------------------------
# the checkpoint directory


@dataclasses.dataclass
class Restored:
    step: int
    params: dict
    opt_state: Any
    rng: dict | None
    meta: dict


class Checkpointer:
    """Orbax ``CheckpointManager`` for adapter checkpoints in ``directory`` (one step per
    subdirectory), keeping the last ``keep`` (None: all). Use as a context manager, or call
    ``close()``: it waits for pending asynchronous saves."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int | None = None,
        async_save: bool = True,
        create: bool = True,
    ):
        self.directory = Path(directory).absolute()
        _silence_abandoned_reads()
        if not create and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        handlers: dict[str, ocp.CheckpointHandler] = {
            name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS
        }
        handlers[META_ITEM] = ocp.JsonCheckpointHandler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=create
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for pending saves, then release Orbax's threads and event loop (on every path,
        so an error never leaves them running into interpreter shutdown)."""
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()

    def wait(self) -> None:
        """Block until every pending save is written and finalised."""
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        """The finalised checkpoints' steps, oldest first (temporary directories excluded)."""
        self._manager.reload()
        # Orbax lists any directory named by a number; one with neither of the files Orbax
        # writes into every checkpoint was not written by it (a stray directory): skip it.
        return sorted(
            step
            for step in self._manager.all_steps()
            if any((self.step_dir(step) / f).exists() for f in _STEP_MARKERS)
        )

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any | None,
        rng: Any | None,
        meta: Mapping[str, Any],
    ) -> None:
        """Start saving a checkpoint of ``step`` (asynchronously); returns once the arrays are
        off the device. ``opt_state`` None: adapters only (such a checkpoint cannot resume a
        training run)."""
        meta = {"format": FORMAT_VERSION, **meta, "step": int(step)}
        items = {
            "adapters": ocp.args.StandardSave(flatten(params)),
            META_ITEM: ocp.args.JsonSave(meta),
        }
        if opt_state is not None:
            items["optimizer"] = ocp.args.StandardSave(flatten(opt_state))
        rng_flat = flatten(_key_data(rng)) if rng is not None else {}
        if rng_flat:
            items["rng"] = ocp.args.StandardSave(rng_flat)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def resolve(self, step: int | None) -> int:
        """``step``, or the latest step for None; CheckpointError if there is no such one."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint of step {step} in {self.directory}; found {steps}"
            )
        return step

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON record of a checkpoint (the latest by default), validated."""
        step = self.resolve(step)
        where = self.step_dir(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
            )[META_ITEM]
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint {where} is corrupt or incomplete: cannot read its {META_ITEM!r} "
                f"record ({_short(e)})"
            ) from e
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(
                f"checkpoint {where}: the {META_ITEM!r} record is not a mapping"
            )
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {where} has format {meta.get('format')!r}; this version reads "
                f"format {FORMAT_VERSION}"
            )
        missing = [k for k in ("step", "adapter_config", "base_model") if k not in meta]
        if missing:
            raise CorruptCheckpointError(f"checkpoint {where}: its record lacks {missing}")
        return meta

    def _item_metadata(self, step: int, items: list[str]) -> dict[str, dict]:
        where = self.step_dir(step)
        try:
            metadata = self._manager.item_metadata(step)
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint {where} is corrupt or incomplete: cannot read its metadata "
                f"({_short(e)})"
            ) from e
        out = {}
        for item in items:
            found = metadata[item] if item in metadata else None
            tree = getattr(found, "tree", found)
            if not isinstance(tree, Mapping):
                if item == "optimizer":
                    raise CheckpointError(
                        f"checkpoint {where} holds adapters only, no optimizer state (it was "
                        "imported or written for inference), so it cannot resume a training run"
                    )
                raise CorruptCheckpointError(f"checkpoint {where} lacks its {item!r} item")
            out[item] = tree
        return out

    def restore(
        self,
        step: int | None = None,
        *,
        params: Any,
        opt_state: Any | None = None,
        rng: Any | None = None,
    ) -> Restored:
        """Read a checkpoint (the latest by default) into the structures of the templates
        ``params`` (and ``opt_state``, ``rng`` when given), checking names and shapes first."""
        step = self.resolve(step)
        where = self.step_dir(step)
        meta = self.read_meta(step)
        templates = {"adapters": flatten(params)}
        if opt_state is not None:
            templates["optimizer"] = flatten(opt_state)
        if rng is not None and jax.tree.leaves(rng):
            templates["rng"] = flatten(rng)
        on_disk = self._item_metadata(step, list(templates))
        for item, flat in templates.items():
            _check_names(flat, on_disk[item], f"checkpoint {where} item {item!r}")
        args = {item: ocp.args.StandardRestore(_abstract(flat)) for item, flat in templates.items()}
        try:
            arrays = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise CorruptCheckpointError(
                f"checkpoint {where} is corrupt or incomplete: cannot read its arrays ({_short(e)})"
            ) from e
        restored = {item: arrays[item] for item in templates}
        for item, flat in restored.items():
            bad = [n for n, x in flat.items() if not bool(jnp.all(jnp.isfinite(x)))]
            if bad and item != "rng":
                raise CorruptCheckpointError(
                    f"checkpoint {where} item {item!r} holds NaN/inf in {bad[:4]}"
                )
        return Restored(
            step=int(meta["step"]),
            params=unflatten_like(params, restored["adapters"], f"checkpoint {where}"),
            opt_state=(
                None
                if opt_state is None
                else unflatten_like(opt_state, restored["optimizer"], f"checkpoint {where}")
            ),
            rng=(
                unflatten_like(rng, restored["rng"], f"checkpoint {where}")
                if "rng" in restored
                else rng
            ),
            meta=meta,
        )


def locate_checkpoint(path: str | os.PathLike) -> tuple[Path, int | None]:
    """``(checkpoint directory, step or None for the latest)`` of a run directory (holding
    ``checkpoints/``), a checkpoint directory, or one step directory inside it."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / META_ITEM).is_dir():
        return path.parent, int(path.name)
    if path.is_dir():
        return path, None
    raise CheckpointError(f"{path} is not a run directory or an adapter checkpoint directory")


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON record (step, adapter_config, base_model, ...) of a checkpoint."""
    directory, step = locate_checkpoint(path)
    with Checkpointer(directory, create=False) as checkpointer:
        return checkpointer.read_meta(step)


def adapter_config_of(meta: Mapping[str, Any], where: str) -> AdapterConfig:
    """The AdapterConfig a checkpoint record holds (CheckpointError if it is invalid)."""
    try:
        return from_dict(AdapterConfig, meta["adapter_config"], where="adapter_config")
    except ConfigError as e:
        raise CheckpointError(f"{where}: invalid adapter config: {e}") from e


def check_adapter_config(saved: AdapterConfig, current: AdapterConfig | None, where: str) -> None:
    """CheckpointError unless the adapters a model carries (``current``; None: none yet) are
    those a checkpoint holds (``saved``)."""
    if current is not None and current != saved:
        raise CheckpointError(
            f"{where} holds adapters of {saved}, but the model already carries different "
            f"adapters ({current}); pass a model without adapters, or with these"
        )


def check_fits(
    meta: Mapping[str, Any], model: LlamaForCausalLM, where: str, *, source: str | None = None
) -> AdapterConfig:
    """The one "same adapter config, same base model" check that loading adapters and resuming
    a run share: the checkpoint's AdapterConfig, after checking that ``model`` is the base model
    it records and carries no other adapters."""
    adapter = adapter_config_of(meta, where)
    check_base_model(meta["base_model"], model, where, source=source)
    check_adapter_config(adapter, getattr(model, "adapter_config", None), where)
    return adapter


def load_adapter(
    model: LlamaForCausalLM,
    checkpoint: str | os.PathLike,
    *,
    check_base: bool = True,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> LlamaForCausalLM:
    """Restore trained adapters onto ``model`` (in place; returned) from ``checkpoint``: a run
    directory (its latest checkpoint), a checkpoint directory, or one step directory.

    The saved AdapterConfig is applied first when the model has no adapters (a model already
    carrying adapters must carry the same config). With ``check_base`` the model must be the
    base model the adapters were trained on (same shape configuration and weight fingerprint),
    else a CheckpointError names both. With ``mesh`` the fresh adapters are placed on it first
    (``rules``, default ``DEFAULT_RULES``), so Orbax reads each adapter straight into its shards.
    """
    directory, step = locate_checkpoint(checkpoint)
    with Checkpointer(directory, create=False) as checkpointer:
        step = checkpointer.resolve(step)
        where = f"checkpoint {checkpointer.step_dir(step)}"
        meta = checkpointer.read_meta(step)
        if check_base:
            adapter = check_fits(meta, model, where)
        else:
            adapter = adapter_config_of(meta, where)
            check_adapter_config(adapter, getattr(model, "adapter_config", None), where)
        if getattr(model, "adapter_config", None) is None:
            apply_adapters(model, adapter)
        if mesh is not None:
            shard_model(model, mesh, rules or DEFAULT_RULES)
        restored = checkpointer.restore(step, params=adapter_arrays(model))
    write_back(model, restored.params)
    return model


@dataclasses.dataclass
class AdapterCheckpoint:
    """An adapter checkpoint read without base weights."""

    adapter: AdapterConfig
    model_config: ModelConfig
    params: dict[str, np.ndarray]  # flat dotted path -> float32 array
    meta: dict[str, Any]
    where: Path


def read_adapter_checkpoint(checkpoint: str | os.PathLike) -> AdapterCheckpoint:
    """The adapters, AdapterConfig and base ModelConfig of a checkpoint (no base weights read)."""
    directory, step = locate_checkpoint(checkpoint)
    with Checkpointer(directory, create=False) as checkpointer:
        meta = checkpointer.read_meta(step)
        where = checkpointer.step_dir(int(meta["step"]))
        adapter = adapter_config_of(meta, f"checkpoint {where}")
        try:
            model_config = from_dict(
                ModelConfig, (meta["base_model"] or {}).get("config"), where="base_model.config"
            )
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {where}: invalid record: {e}") from e
        model = abstract_adapted_model(model_config, adapter)
        restored = checkpointer.restore(int(meta["step"]), params=adapter_arrays(model))
    params = {name: np.asarray(x, np.float32) for name, x in flatten(restored.params).items()}
    return AdapterCheckpoint(adapter, model_config, params, restored.meta, where)


def save_adapter_checkpoint(
    model: LlamaForCausalLM,
    directory: str | os.PathLike,
    *,
    source: str | None,
    step: int = 0,
    extra_meta: Mapping[str, Any] | None = None,
) -> None:
    """Save the adapters ``model`` carries (no optimizer state) with their AdapterConfig and
    the base-model record as a checkpoint of ``step`` in ``directory``, synchronously: what
    ``load_adapter`` and ``load_model(base, adapter=...)`` read."""
    if getattr(model, "adapter_config", None) is None:
        raise CheckpointError("the model carries no adapters to save")
    meta = {
        "adapter_config": to_dict(model.adapter_config),
        "base_model": base_model_record(model, source),
        "data_state": None,
        **(extra_meta or {}),
    }
    with Checkpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(step, params=adapter_arrays(model), opt_state=None, rng=None, meta=meta)

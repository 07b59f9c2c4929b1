"""The multi-host start: ``jax.distributed.initialize`` with explicit arguments or JAX's own
auto-detection (TPU VMs, SLURM, Open MPI), and which process is the main one."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from difflora_jax.errors import ConfigError

# Environment markers of the launchers jax.distributed.initialize() detects by itself.
_AUTO_DETECTED = (
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
) -> bool:
    """Join a multi-process JAX run; returns whether it is one (more than one process).

    With ``coordinator_address`` (``HOST:PORT``), ``num_processes`` and ``process_id`` all
    given, every process calls ``jax.distributed.initialize`` with them. With none given, it
    is called without arguments where a launcher JAX recognises is present (a TPU VM pod
    slice, SLURM, Open MPI), and not at all otherwise (a single-process run). On CPU the
    cross-process collectives use gloo. ``local_device_count``: CPU devices per process
    (``XLA_FLAGS`` cannot be changed once JAX has started).
    """
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ConfigError(
            "--coordinator-address, --num-processes and --process-id go together: give all "
            f"three or none (got {given})"
        )
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if coordinator_address is None and not any(k in os.environ for k in _AUTO_DETECTED):
        return False
    if coordinator_address is not None:
        assert num_processes is not None and process_id is not None
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} is not in [0, {num_processes})")
    # CPU processes exchange collectives over gloo (accelerators use their own fabric)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0: the one that prints, logs metrics and writes TensorBoard."""
    return jax.process_index() == 0


def gather_max(array: np.ndarray) -> np.ndarray:
    """The elementwise maximum of ``array`` over all processes (a collective: every process
    calls it); ``array`` itself in a single-process run."""
    if jax.process_count() == 1:
        return array
    gathered = multihost_utils.process_allgather(np.asarray(array))  # [processes, ...]
    return np.asarray(gathered).max(axis=0).astype(array.dtype)

"""``MeshConfig`` (``data``, ``fsdp``, ``tensor``) and the device mesh it describes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from difflora_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis: ``data`` (replicas, each with the whole model), ``fsdp`` (the
    batch and the parameters' ``embed`` dimension split), ``tensor`` (heads, MLP and
    vocabulary split). One axis may be ``-1``: all the devices the others leave. Default: every
    device on ``data``. Set from the command line as ``mesh.fsdp=4``."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = self.sizes()
        for name, size in zip(MESH_AXES, sizes):
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ConfigError(
                    f"config field 'mesh.{name}' = {size!r} is invalid: must be a positive "
                    "integer or -1 (the rest of the devices)"
                )
        if sizes.count(-1) > 1:
            raise ConfigError(f"mesh {self}: at most one axis may be -1")

    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The axis sizes for ``num_devices`` devices (``-1`` filled in), checked to multiply
        to it."""
        self.validate()
        sizes = list(self.sizes())
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(
                    f"mesh {self}: the fixed axes ({known} devices) do not divide the "
                    f"{num_devices} devices"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but "
                f"{num_devices} are available"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all, every process's) with axes ``data``, ``fsdp``,
    ``tensor`` (automatic sharding propagation inside jit)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * 3, devices=devices)
    except (ValueError, NotImplementedError, RuntimeError):
        # make_mesh wants a device layout it knows (TPU/GPU topologies); fall back to the
        # given order, as on CPU.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)

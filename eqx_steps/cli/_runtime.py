"""Starting JAX for a command: the devices, a multi-process job, host copies."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..platform import (
    backends_started,
    configure_xla_flags,
    default_cpu_devices,
    requested_cpu_devices,
)
from ._errors import reported, UsageError


def distributed_args(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The arguments of `distributed.initialize`, or `None` for a one-process run.

    A run is multi-process when an option (`--coordinator`, `--num-processes`,
    `--process-id`) or the environment (`JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`) says so.
    """
    from ..distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES

    given = {
        "coordinator_address": settings.get("coordinator"),
        "num_processes": settings.get("num_processes"),
        "process_id": settings.get("process_id"),
    }
    if all(v is None for v in given.values()) and not (
        os.environ.get(ENV_COORDINATOR) or os.environ.get(ENV_NUM_PROCESSES)
    ):
        return None
    return given


def start_jax(devices: int | None, distributed: dict[str, Any] | None) -> None:
    """Configure the devices (and join a multi-process job) before JAX starts.

    Without `devices` and without a count in `XLA_FLAGS`, the host CPU is split
    into [`eqx_steps.platform.default_cpu_devices`][] devices. When JAX has
    already started in this process (the command called from Python), its device
    count stands: a different `devices` is refused.
    """
    import jax

    if backends_started():
        if distributed is not None:
            raise UsageError(
                "the multi-process options need a fresh process: JAX has already "
                "started in this one"
            )
        n = jax.local_device_count()
        if devices is not None and devices != n and jax.default_backend() == "cpu":
            raise UsageError(
                f"--devices {devices}: JAX has already started in this process with "
                f"{n} devices; pass --devices {n} or leave it out"
            )
        return
    if devices is None and requested_cpu_devices() is None:
        devices = default_cpu_devices()
    configure_xla_flags(devices)
    if distributed is not None:
        from ..distributed import initialize

        with reported():
            initialize(**distributed)


def is_main_process() -> bool:
    """Whether this process writes files and prints (process 0)."""
    import jax

    return jax.process_index() == 0


def host(tree: Any) -> Any:
    """A host copy of each array leaf (a multi-process array: this process's copy)."""
    import jax

    def leaf(x):
        if isinstance(x, jax.Array):
            if not x.is_fully_addressable:
                x = x.addressable_data(0)
            return np.asarray(x)
        return x

    return jax.tree_util.tree_map(leaf, tree)

"""Starting JAX for a command: the devices, a multi-process job, the compilation
cache, host copies."""

from __future__ import annotations

import os
import warnings
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


ENV_COMPILATION_CACHE = "EQX_STEPS_COMPILATION_CACHE"
"""Environment variable: the folder of the command's compilation cache, or `off`."""

_OFF = ("off", "none", "no", "0", "false")


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/eqx_steps/jax` (`~/.cache/eqx_steps/jax` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "eqx_steps", "jax")


def compilation_cache_dir(option: str | None) -> str | None:
    """The folder of the command's persistent compilation cache, or `None` (off).

    **Arguments:**

    - `option`: the `--compilation-cache` value (`None` when not given); else
        `EQX_STEPS_COMPILATION_CACHE`; else [`default_cache_dir`][]. `off` (or
        `none`, `0`, `false`, empty) turns the cache off, JAX's own included
        (the command then ignores `JAX_COMPILATION_CACHE_DIR`).

    **Returns:**

    The folder (user and environment variables expanded), or `None`.
    """
    value = option if option is not None else os.environ.get(ENV_COMPILATION_CACHE)
    if value is None:
        return default_cache_dir()
    if value.strip().lower() in (*_OFF, ""):
        return None
    return os.path.abspath(os.path.expanduser(os.path.expandvars(value)))


# Set by the entry point from `--compilation-cache` (None: not given).
cache_option: str | None = None


def _enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path`, for every program the command
    compiles (XLA:CPU too), however quick to compile (unless
    `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` sets a minimum)."""
    import jax

    with reported(f"--compilation-cache {path}: "):
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # A cache entry that cannot be written (a full disk) only costs a compile
    # next time: not worth JAX's multi-line warning beside the command's output.
    warnings.filterwarnings(
        "ignore", message="Error writing persistent compilation cache entry"
    )
    # The default (1 s) would leave out the evaluation steps and the placement
    # programs, which a run compiles too; reading them back is quicker. A
    # minimum the environment sets is the user's choice and stays.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


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
    # Only when the command starts JAX itself: called from Python (JAX already
    # running, above), it leaves the caller's JAX configuration alone.
    cache = compilation_cache_dir(cache_option)
    if cache is not None:
        _enable_compilation_cache(cache)
    else:  # off means off, even with JAX_COMPILATION_CACHE_DIR in the environment
        jax.config.update("jax_enable_compilation_cache", False)
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

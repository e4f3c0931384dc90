"""Multi-process training on JAX's own distributed runtime (`jax.distributed`).

Call [`eqx_steps.distributed.initialize`][] first thing in every process, before
anything touches JAX devices; then build the state, iterators and steps as usual
with `backend="sharded"`. See [Several processes and several
hosts][several-processes-and-several-hosts].
"""

from __future__ import annotations

import os
import sys

import jax

from ._validate import check_int
from .platform import backends_started


ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; set it to "
            "a whole number or unset it."
        ) from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 60,
    heartbeat_timeout_s: int = 30,
    local_device_count: int | None = None,
) -> None:
    """Join a multi-process JAX job (a thin wrapper of `jax.distributed.initialize`).

    Must run before anything touches JAX devices (`jax.devices()`, creating an
    array, building a model). The coordinator address, process count and process
    id come from the arguments, else from the environment variables
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, else JAX
    detects them itself (SLURM, Open MPI and other clusters it knows).

    Before connecting it prints, on stderr, the coordinator address, the number
    of processes and the timeout: if a peer never arrives, JAX ends the process
    natively (an abort, not a Python exception) once `timeout_s` has passed, and
    that line says what it was waiting for.

    **Arguments:**

    - `coordinator_address`: `"host:port"` of process 0's coordinator service.
    - `num_processes`: the number of processes in the job.
    - `process_id`: this process's index, `0 <= process_id < num_processes`.
    - `timeout_s`: how long to wait for all processes to connect (JAX's default
        is 300 s).
    - `heartbeat_timeout_s`: after how long without a heartbeat a peer counts as
        dead (JAX's default is 100 s).
    - `local_device_count`: on CPU, split the host into this many devices
        (`jax_num_cpu_devices`), e.g. to test a multi-device job on one machine.

    **Returns:**

    Nothing. Afterwards `jax.process_count()`, `jax.process_index()` and
    `jax.devices()` describe the whole job.

    **Raises:**

    `RuntimeError` when JAX has already started its backends; `TypeError` or
    `ValueError` naming an argument of the wrong type or out of range.
    """
    if backends_started():
        raise RuntimeError(
            "eqx_steps.distributed.initialize must run before JAX starts its "
            "backends, but something already touched JAX devices (jax.devices(), an "
            "array, a model). Call it first thing in the program, right after the "
            "imports."
        )
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID)
    timeout_s = check_int("timeout_s", timeout_s, minimum=1)
    heartbeat_timeout_s = check_int(
        "heartbeat_timeout_s", heartbeat_timeout_s, minimum=1
    )
    if num_processes is not None:
        num_processes = check_int("num_processes", num_processes, minimum=1)
    if process_id is not None:
        process_id = check_int("process_id", process_id, minimum=0)
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(
                f"`process_id` = {process_id} must be in [0, {num_processes}) for "
                f"num_processes = {num_processes}."
            )
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(
            f"`coordinator_address` = {coordinator_address!r} must be 'host:port', "
            "e.g. '10.0.0.1:1234'."
        )
    if local_device_count is not None:
        local_device_count = check_int("local_device_count", local_device_count)
        jax.config.update("jax_num_cpu_devices", local_device_count)
    me = "?" if process_id is None else process_id
    total = "?" if num_processes is None else num_processes
    print(
        f"eqx_steps.distributed: process {me} of {total} connecting to "
        f"coordinator {coordinator_address or '(auto-detected)'}; waiting up to "
        f"{timeout_s} s for all {total} processes",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )


def is_main_process() -> bool:
    """Whether this is process 0 (the one that logs and shows progress)."""
    return jax.process_index() == 0

"""The input-pipeline state in a checkpoint: its format, the check that a saved
state fits the input it resumes, and the gather of every process's state.

`GrainStream` (`_grain.py`) records the state of its Grain iterator after every
batch; these functions turn the state of one step into the JSON a checkpoint
stores, and back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np


STATE_FORMAT = 1
"""The version of the input-pipeline state stored in checkpoints."""


def saved_state(
    own: Mapping[str, Any],
    *,
    step: int,
    source: str,
    batch_size: int | None,
    rows: str | None,
    process_count: int,
) -> dict[str, Any]:
    """The JSON a checkpoint of `step` stores for an input whose state at that step
    is `own`: every process's state when the batches are per-process (a collective:
    every process calls this at the same step), this process's otherwise (every
    process holds the same)."""
    states = [dict(own)]
    if rows == "process" and process_count > 1:
        states = allgather_json(dict(own))
    return {
        "format": STATE_FORMAT,
        "source": source,
        "batch_size": batch_size,
        "rows": rows,
        "process_count": process_count,
        "step": step,
        "states": states,
    }


def own_state(
    saved: Mapping[str, Any],
    *,
    step: int,
    name: str,
    source: str,
    batch_size: int | None,
    process_index: int,
    process_count: int,
) -> dict[str, Any]:
    """This process's state in `saved` (from `saved_state`), checked against the
    input it resumes.

    **Raises:** `ValueError` when `saved` is of another format, another kind of
    input, another global batch size (`batch_size=None`: any), or (per-process
    batches) another number of processes, naming both.
    """
    where = f"the input-pipeline state of checkpoint step {step}"
    states = saved.get("states")
    if (
        saved.get("format") != STATE_FORMAT
        or not isinstance(states, list)
        or not (states)
    ):
        raise ValueError(
            f"{where} has format {saved.get('format')!r}, not {STATE_FORMAT}; "
            "it was saved by another version of eqx_steps."
        )
    if saved.get("source") != source:
        raise ValueError(
            f"{where} is of a Grain {saved.get('source')}, but `{name}` is a "
            f"{source}: resume with the same kind of input."
        )
    if batch_size is not None and saved.get("batch_size") != batch_size:
        raise ValueError(
            f"{where} has the global batch size {saved.get('batch_size')}, but "
            f"this run's is {batch_size}; resume with the same "
            "config['batch_size'] (the batches would differ otherwise)."
        )
    if saved.get("rows") != "process":
        return dict(states[0])
    if saved.get("process_count") != process_count or len(states) != process_count:
        n = saved.get("process_count")
        raise ValueError(
            f"{where} holds per-process pipeline states of {n} processes, but this "
            f"run has {process_count}: a pipeline sharded by process resumes on the "
            f"same number of processes only. Resume with {n} processes, or build a "
            "pipeline of global batches (every process reads the same pipeline), "
            "which resumes on any number of processes and devices."
        )
    return dict(states[process_index])


def allgather_json(value: Any) -> list[Any]:
    """`value` (JSON) of every process, in process order (a collective)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [
        json.loads(bytes(row[: int(n)]).decode())
        for row, n in zip(everyone, np.asarray(sizes).reshape(-1))
    ]

"""Hooks of the training loop: what they see (`StepInfo`), when they run, and the
built-in ones (metric records, `metrics.jsonl`, the progress bar).

As in Levanter's trainer, the loop only runs the steps; everything else it does
(evaluate and record, write metrics, show progress, save checkpoints) is a hook
`fn(info)` called after the calls that reach its points.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._history import format_record, History
from ._validate import is_int
from .state import TrainState


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a hook sees: the training run right after one call of the step.

    **Attributes:**

    - `step`: the global step reached (the number of steps done).
    - `epoch`: `step // steps_per_epoch`.
    - `state`: the [`eqx_steps.TrainState`][] after the call. The trainer donates
        it to the next call, so a hook that keeps it (say, the best model so far)
        keeps a copy: `jax.tree_util.tree_map(jnp.copy, eqx.filter(state,
        eqx.is_array))`, or `jax.device_get` of what it needs.
    - `metrics`: the train metrics of the call (device arrays; with
        `steps_per_call = K > 1` each has a leading axis of `K`, one per step).
    - `steps`: how many steps the call ran (1 or `steps_per_call`).
    """

    step: int
    epoch: int
    state: TrainState
    metrics: Mapping[str, Any]
    steps: int


@dataclasses.dataclass(frozen=True)
class Hook:
    """A function of a `StepInfo` and how often it runs, in steps."""

    fn: Callable[[StepInfo], Any]
    every: int

    def due(self, before: int, after: int, last: bool) -> bool:
        """Whether a call from step `before` to `after` reached a multiple of
        `every`, or is the last call of the run."""
        return last or after // self.every > before // self.every


class Recorder:
    """The History's hooks: `collect` after every call, `record` at log points.

    A record holds the train metrics averaged over the steps since the previous
    record and the evaluation of the state on the test set. Its `time` is the
    elapsed training time: the seconds since this `train()` began, plus the
    `time` of the history's last record from before it (a resumed run, whose
    records [`metrics_file`][] loaded, or an earlier `train()` of the trainer).
    """

    def __init__(self, history: History, evaluate: Callable[[TrainState], Mapping]):
        self.history = history
        self.evaluate = evaluate
        self.pending: list[Mapping[str, Any]] = []
        self.t0 = time.time()
        self.earlier: float | None = None  # read at the first record

    def collect(self, info: StepInfo) -> None:
        self.pending.append(info.metrics)

    def record(self, info: StepInfo) -> None:
        train = _means(self.pending)  # waits for the steps
        self.pending = []
        if self.earlier is None:
            last = self.history.records[-1] if self.history.records else {}
            self.earlier = float(last.get("time", 0.0))
        record: dict[str, float] = {
            "epoch": info.epoch,
            "step": info.step,
            "time": self.earlier + time.time() - self.t0,
        }
        record.update({f"train_{k}": v for k, v in train.items()})
        evaluation = self.evaluate(info.state)
        record.update({f"eval_{k}": float(v) for k, v in evaluation.items()})
        self.history.append(record)


def _means(metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each metric over the calls (and their steps), on the host.

    Each array is read with `np.asarray`: for metrics on one device ~5x faster
    than one `jax.device_get` of the list (which costs ~30 us per call's dict).
    """
    if not metrics:
        return {}
    return {
        k: float(
            np.mean(np.concatenate([np.atleast_1d(np.asarray(m[k])) for m in metrics]))
        )
        for k in metrics[0]
    }


def progress_bar(initial: int, total: int) -> Any:
    """The trainer's progress bar (a `tqdm`, on stdout), a context manager."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        file=sys.stdout,
        dynamic_ncols=True,
    )


def progress(bar: Any, history: History) -> Callable[[StepInfo], None]:
    """The progress bar's hook: advance `bar` (a `tqdm`) by the steps of each
    call; after a record, show its metrics beside it and write its line."""

    def update(info: StepInfo) -> None:
        bar.update(info.steps)
        record = history.records[-1] if history.records else {}
        if record.get("step") == info.step:
            shown = {"loss": record.get("train_loss")} | {
                k: v for k, v in record.items() if k.startswith("eval_")
            }
            bar.set_postfix(
                {k: f"{v:.4g}" for k, v in shown.items() if v is not None},
                refresh=False,
            )
            bar.write(format_record(record))

    return update


def metrics_file(path: str, start_step: int, history: History) -> Callable:
    """The hook that appends each new record to `path` as one JSON line.

    A record already in the file for a step after `start_step` (the run resumes
    from an earlier checkpoint) and a line cut short by a crash are removed first,
    once; after that the file is only ever appended to. When `history` is empty
    (a new trainer resuming a run), the records kept in the file are loaded into
    it first, so that the history (its curves, its `time`) continues across the
    resume.
    """
    _truncate_after(path, start_step)
    if start_step and not history.records:
        for record in read_records(path):
            history.append(record)

    def append(info: StepInfo) -> None:
        _append_line(path, json.dumps(history.records[-1]))

    return append


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file (none when it does not exist; a
    damaged line is skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _append_line(path: str, text: str) -> None:
    """Append `text` and a newline to `path` and flush it to disk.

    A crash part-way leaves the earlier lines as they were and at most one
    incomplete last line (which `_truncate_after` removes).
    """
    data = (text + "\n").encode()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _truncate_after(path: str, step: int) -> None:
    """Cut `path` (JSON lines with a `"step"`) before its first line that is
    incomplete, unreadable or of a step after `step`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    keep = 0
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            record = None
        line_step = record.get("step") if isinstance(record, dict) else None
        if line_step is None or not is_int(line_step) or line_step > step:
            break
        keep += len(line)
    if keep < len(data):
        os.truncate(path, keep)

"""Grain inputs: host batches by global step, their resumable state, and their
placement on the devices.

`GrainStream` reads a Grain `MapDataset`, `IterDataset` or `DataLoader` that
yields batches (dicts of arrays), validates each batch, keeps this process's rows
and records, after every batch, the state of the Grain iterator (JSON) from which
the next batch follows (`_grain_iter` places its batches on the devices).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from .._iterate_data import take
from .._validate import check_int, is_grain as is_grain
from ._common import grain_ready, host_batch, kind, PipelineError, Renamed
from ._grain_state import own_state, saved_state


_READ_THREADS = 4
_READ_BUFFER = 8
"""How a `MapDataset` is read: `to_iter_dataset` with this many threads and
elements read ahead (Grain's defaults, 16 and 500, hold hundreds of batches)."""


def _rows(batch: Mapping[str, Any]) -> int:
    return int(jax.tree_util.tree_leaves(batch)[0].shape[0])


class GrainStream:
    """The host batches of a Grain input by global step, and the state to resume at
    each step.

    Each element the Grain input yields is one batch: a dict of arrays (or of
    PyTrees of arrays) with equal leading size. A batch of `batch_size` rows is
    the **global** batch (every process reads the same pipeline; this process
    keeps rows `[p*B/P, (p+1)*B/P)`, as for a dict of arrays); in a run of `P > 1`
    processes, a batch of `batch_size / P` rows is this process's share (the
    pipeline was sharded by process, e.g. with `grain.sharding.ShardByJaxProcess`).
    The first batch decides which, for the whole run.

    For training, when the input ends it is read again (a new pass: a
    `MapDataset` or `IterDataset` is iterated afresh, a `DataLoader` too), so an
    input may be finite (one epoch) or endless. For evaluation, one pass; its
    last batch may be smaller (the remainder, global batches only).

    **Arguments:**

    - `source`: the Grain `MapDataset`, `IterDataset` or `DataLoader`.
    - `batch_size`: the global batch size, or `None` to take the first batch's
        size as the global batch size.
    - `train`: endless passes of full batches, or one pass.
    - `name`: how errors name the input (`"train_ds"`).
    - `process_index`, `process_count`: override `jax.process_index()` and
        `jax.process_count()`.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int | None,
        *,
        train: bool,
        name: str = "dataset",
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.rename: Callable[[Any], Any] = lambda batch: batch
        if isinstance(source, Renamed):
            source, self.rename = source.source, source.fn
        self.source = source
        self.kind = kind(source)
        self.name = name
        self.train = bool(train)
        self.batch_size = (
            None if batch_size is None else check_int("batch_size", batch_size)
        )
        self.process_count = (
            jax.process_count() if process_count is None else process_count
        )
        self.process_index = (
            jax.process_index() if process_index is None else process_index
        )
        self.rows: str | None = None  # "global" or "process", set by the first batch
        self._saved_rows: tuple[str, int] | None = None  # the layout restored
        self.steps_per_epoch: int | None = None
        try:  # a MapDataset, or an IterDataset that counts its epoch's batches
            n = len(source)
        except TypeError:
            n = 0
        self.steps_per_epoch = n if 0 < n < sys.maxsize // 2 else None
        self._it: Any = None
        self.passes = 0  # the pass the open iterator reads
        self._in_pass = 0  # batches read in that pass
        self.pulled = 0  # the global step of the next batch read
        self._cache: dict[int, Any] = {}
        self._states: dict[int, dict[str, Any]] = {0: self._state(None)}
        self.remainder: Any = None  # the smaller last evaluation batch, when read
        self.remainder_rows = 0
        self.ended = False  # an evaluation pass read to its end

    # -- Grain iterators

    def _open(self, grain_state: Any) -> Any:
        grain_ready()
        if self.kind == "MapDataset":
            import grain

            options = grain.ReadOptions(
                num_threads=_READ_THREADS, prefetch_buffer_size=_READ_BUFFER
            )
            it = iter(self.source.to_iter_dataset(options))
        else:
            it = iter(self.source)
        if grain_state is not None:
            if self.kind == "DataLoader":
                it.set_state(json.dumps(grain_state).encode())
            else:
                it.set_state(grain_state)
        return it

    def _grain_state(self) -> Any:
        state = self._it.get_state()
        if isinstance(state, bytes):  # a DataLoader's: JSON text
            return json.loads(state.decode())
        return json.loads(json.dumps(state))  # a copy, checked to be JSON

    def _state(self, grain_state: Any) -> dict[str, Any]:
        return {"pass": self.passes, "in_pass": self._in_pass, "grain": grain_state}

    @staticmethod
    def failed(error: BaseException) -> bool:
        """Whether `error` is the input pipeline's failure (a `PipelineError`)."""
        return isinstance(error, PipelineError)

    def close(self) -> None:
        """Stop the Grain iterator (and its worker processes)."""
        it, self._it = self._it, None
        close = getattr(getattr(it, "_iterator", it), "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # closing is best effort
                pass

    # -- reading

    def _next_raw(self) -> Any:
        if self._it is None:
            self._it = self._open(self._states.get(self.pulled, {}).get("grain"))
        try:
            return next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            cause = (
                str(e) if isinstance(e, PipelineError) else f"{type(e).__name__}: {e}"
            )
            raise PipelineError(
                f"the input pipeline `{self.name}` ({self.kind}) failed reading the "
                f"batch of step {self.pulled}: {cause}",
                self.pulled,
            ) from e

    def _too_few(self, rows: int) -> ValueError:
        want = self.batch_size
        return ValueError(
            f"`{self.name}` yields fewer examples than one global batch: a pass holds "
            f"{rows} examples, fewer than `batch_size` = {want}; use a batch size of "
            f"at most {rows} (a multiple of the {jax.device_count()} devices), or "
            "more data."
        )

    def _pull(self) -> None:
        """Read the batch of step `self.pulled` into the cache."""
        while True:
            try:
                raw = self._next_raw()
                break
            except StopIteration:
                if not self.train:
                    self.ended = True
                    raise
                if self._in_pass == 0:
                    self.close()
                    raise ValueError(
                        f"`{self.name}` yields no batch: a pass holds fewer examples "
                        f"than one global batch of `batch_size` = {self.batch_size} "
                        "(batched with drop_remainder=True), or is empty; use a "
                        "smaller batch size or more data."
                    ) from None
                self.close()
                self.passes += 1
                self._in_pass = 0
                self._it = self._open(None)
        batch = self._accept(raw)
        if batch is None:  # the smaller last evaluation batch
            try:
                self._next_raw()
            except StopIteration:
                self.ended = True
                raise
            raise ValueError(
                f"`{self.name}` yielded a batch of {self.remainder_rows} examples "
                f"before the end of its pass; only the last batch may be smaller "
                f"than `batch_size` = {self.batch_size}."
            )
        self._cache[self.pulled] = batch
        self.pulled += 1
        self._in_pass += 1
        self._states[self.pulled] = self._state(self._grain_state())

    def _accept(self, raw: Any) -> Any:
        """`raw` checked and cut to this process's rows; `None` for the smaller
        last evaluation batch (kept whole in `remainder`)."""
        batch, rows = host_batch(self.rename(raw), self.name, self.batch_size)
        pc = self.process_count
        if self.batch_size is None:
            self.batch_size = rows
        b = self.batch_size
        if self.rows is None:
            if rows == b:
                self.rows = "global"
            elif pc > 1 and rows * pc == b:
                self.rows = "process"
            elif rows < b and self.pulled == 0:
                if not self.train:
                    self.rows = "global"
                else:  # one small batch in the pass, or no batching at all?
                    try:
                        self._next_raw()
                    except StopIteration:
                        raise self._too_few(rows) from None
                    raise self._wrong_size(rows)
            else:
                raise self._wrong_size(rows)
            self._check_layout()
        full = b if self.rows == "global" else b // pc
        if rows == full:
            if self.rows == "process" or pc == 1:
                return batch  # this process's rows already
            lo = self.process_index * (b // pc)
            return take(batch, np.arange(lo, lo + b // pc))
        if rows < full and not self.train and self.rows == "global":
            self.remainder, self.remainder_rows = batch, rows
            return None
        if rows < full and self.train:
            raise ValueError(
                f"`{self.name}` yielded a batch of {rows} examples at step "
                f"{self.pulled}, smaller than the {full} of a "
                f"{'global' if self.rows == 'global' else 'per-process'} batch "
                f"(`batch_size` = {b}): training takes full batches only; batch "
                "the dataset with `.batch(batch_size, drop_remainder=True)`."
            )
        raise self._wrong_size(rows)

    def _check_layout(self) -> None:
        """Refuse a pipeline whose layout is not that of the state restored."""
        if self._saved_rows is None or self._saved_rows[0] == self.rows:
            return
        was, step = self._saved_rows
        layout = {"global": "global batches", "process": "per-process batches"}
        raise ValueError(
            f"the input-pipeline state of checkpoint step {step} is of a pipeline "
            f"of {layout.get(was, was)}, but `{self.name}` yields "
            f"{layout.get(str(self.rows), str(self.rows))} (batch size "
            f"{self.batch_size}, {self.process_count} processes): resume with the "
            "pipeline the run was started with."
        )

    def _wrong_size(self, rows: int) -> ValueError:
        b, pc = self.batch_size or rows, self.process_count
        share = (
            f" or this process's share, {b // pc} ({pc} processes)" if pc > 1 else ""
        )
        return ValueError(
            f"`{self.name}` yielded a batch of {rows} examples; each element of a "
            f"Grain input must be a global batch of `batch_size` = {b} examples"
            f"{share}; a dataset of single examples must be batched: "
            f"`.batch({b}, drop_remainder=True)`."
        )

    def batch(self, step: int) -> Any:
        """This process's host batch of global step `step` (read as needed).

        **Raises:** `StopIteration` past the end of an evaluation pass.
        """
        while self.pulled <= step:
            self._pull()
        try:
            return self._cache[step]
        except KeyError:
            raise ValueError(
                f"the batch of step {step} of `{self.name}` was released; the input "
                "is read forwards only."
            ) from None

    def release_before(self, step: int) -> None:
        """Forget the batches and states of the steps before `step`."""
        for d in (self._cache, self._states):
            for s in [s for s in d if s < step]:
                del d[s]

    def peek(self) -> Any:
        """The first host batch at the current position (read, not consumed)."""
        return self.batch(self.pulled if not self._cache else min(self._cache))

    # -- state

    def state_at(self, step: int) -> dict[str, Any]:
        """The state from which the batch of `step` follows (JSON)."""
        if step not in self._states:
            raise ValueError(
                f"the input state of step {step} of `{self.name}` is not held (held: "
                f"{sorted(self._states)})."
            )
        return self._states[step]

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """The JSON saved in the checkpoint of `step`: every process's state.

        In a multi-process run whose pipeline yields per-process batches, the
        states of all processes are gathered (a collective: every process
        calls this at the same step).
        """
        return saved_state(
            self.state_at(step),
            step=step,
            source=self.kind,
            batch_size=self.batch_size,
            rows=self.rows,
            process_count=self.process_count,
        )

    def restore(self, step: int, saved: Mapping[str, Any] | None) -> None:
        """Continue from the checkpointed state `saved` of global step `step`
        (from [`eqx_steps.load_data_state`][]); `None`: from the input's start,
        its first batch being the batch of `step`.

        **Raises:** `ValueError` when `saved` is of another kind of input, another
        global batch size, another layout, or (per-process batches) another
        number of processes, naming both.
        """
        if saved is None:
            self.close()
            self._cache.clear()
            self.pulled, self.passes, self._in_pass = step, 0, 0
            self._states = {step: self._state(None)}
            return
        own = own_state(
            saved,
            step=step,
            name=self.name,
            source=self.kind,
            batch_size=self.batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        if self.batch_size is None and isinstance(saved.get("batch_size"), int):
            self.batch_size = saved["batch_size"]  # the first batch is read after
        rows = saved.get("rows")
        self._saved_rows = (str(rows), step) if rows else None
        if self.rows is not None:
            self._check_layout()
        self.close()
        self._cache.clear()
        self.pulled = step
        self.passes, self._in_pass = int(own["pass"]), int(own["in_pass"])
        self._states = {step: dict(own)}

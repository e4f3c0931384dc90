"""Grain inputs: host batches by global step, their resumable state, and their
placement on the devices.

`GrainStream` reads a Grain `MapDataset`, `IterDataset` or `DataLoader` that
yields batches (dicts of arrays), validates each batch, keeps this process's rows
and records, after every batch, the state of the Grain iterator (JSON) from which
the next batch follows. `GrainIter` is what `create_input_iter` returns for a
Grain input: items of `steps_per_call` batches, cast, shaped and placed on the
local devices a few items ahead, as `DeviceIter` does for a dict of arrays.
"""

from __future__ import annotations

import collections
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .._iterate_data import host_leaf, take
from .._validate import check_int, is_grain as is_grain
from ..data import cast_batch
from ..parallel import device_mesh, shard
from ..parallel._mesh import host_placer
from ..state import DEVICE_AXIS


STATE_FORMAT = 1
"""The version of the input-pipeline state stored in checkpoints."""

_READ_THREADS = 4
_READ_BUFFER = 8
"""How a `MapDataset` is read: `to_iter_dataset` with this many threads and
elements read ahead (Grain's defaults, 16 and 500, hold hundreds of batches)."""


class PipelineError(RuntimeError):
    """The input pipeline stopped: a transform that raised (in the main process
    or in a Grain worker process), an image that could not be decoded (with
    `on_error="raise"`), a worker process that died.

    Raised when reading a batch of a Grain input fails: the message names the
    cause (and, from `BasicTrainer`, the step and the last intact checkpoint);
    `__cause__` is the original exception. The training stops there; a run with
    checkpointing resumes from its last checkpoint, with the batches it would
    have seen.

    **Attributes:** `step`, the global step (batch number) whose batch could
    not be read, or `None` when not known.
    """

    def __init__(self, text: str, step: int | None = None):
        super().__init__(text)
        self.step = step


class _Renamed:
    """A Grain input whose batches pass through `fn` (the trainer's renaming of
    the input and target entries)."""

    eqx_steps_grain_input = True  # what `is_grain` looks for

    def __init__(self, source: Any, fn: Callable[[Any], Any]):
        self.source, self.fn = source, fn


def renamed(source: Any, fn: Callable[[Any], Any]) -> Any:
    """`source` (a Grain input) with each batch passed through `fn`."""
    return _Renamed(source, fn)


def _kind(source: Any) -> str:
    for c in type(source).__mro__:
        if c.__module__.split(".")[0] == "grain" and c.__name__ in (
            "MapDataset",
            "IterDataset",
            "DataLoader",
        ):
            return c.__name__
    raise TypeError(f"not a Grain input: {type(source).__name__}")


def _grain_ready() -> None:
    """Let Grain read its settings outside an absl program.

    Grain's worker processes read absl flags, which raise
    `UnparsedFlagAccessError` until the program's flags are parsed; a program
    that does not use `absl.app` never parses them. Marking them parsed keeps
    every flag at its default (as an absl program run without flags has them).
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


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
        if isinstance(source, _Renamed):
            source, self.rename = source.source, source.fn
        self.source = source
        self.kind = _kind(source)
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
        _grain_ready()
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
        batch = self.rename(raw)
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"`{self.name}` yielded a {type(batch).__name__}; each element of a "
                "Grain input must be a batch, a dict of arrays such as "
                "{'image': x, 'label': y}: batch the dataset with "
                "`.batch(batch_size, drop_remainder=True)`."
            )
        batch = {
            k: jax.tree_util.tree_map_with_path(
                lambda p, x, k=k: host_leaf(
                    f"{self.name}[{k!r}]{jax.tree_util.keystr(p)}", x
                ),
                v,
            )
            for k, v in batch.items()
        }
        sizes = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(batch)}
        if len(sizes) != 1:
            b = self.batch_size or "batch_size"
            raise ValueError(
                f"`{self.name}` yielded an element whose entries have different "
                f"leading sizes {sorted(sizes)}: each element of a Grain input must "
                "be a batch, every array with one row per example; a dataset of "
                f"single examples must be batched: `.batch({b}, drop_remainder=True)`."
            )
        rows = sizes.pop()
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
        own = self.state_at(step)
        states = [own]
        if self.rows == "process" and self.process_count > 1:
            states = _allgather_json(own)
        return {
            "format": STATE_FORMAT,
            "source": self.kind,
            "batch_size": self.batch_size,
            "rows": self.rows,
            "process_count": self.process_count,
            "step": step,
            "states": states,
        }

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
        where = f"the input-pipeline state of checkpoint step {step}"
        if (
            saved.get("format") != STATE_FORMAT
            or not isinstance(saved.get("states"), list)
            or not saved["states"]
        ):
            raise ValueError(
                f"{where} has format {saved.get('format')!r}, not {STATE_FORMAT}; "
                "it was saved by another version of eqx_steps."
            )
        if saved.get("source") != self.kind:
            raise ValueError(
                f"{where} is of a Grain {saved.get('source')}, but `{self.name}` is a "
                f"{self.kind}: resume with the same kind of input."
            )
        if self.batch_size is None and isinstance(saved.get("batch_size"), int):
            self.batch_size = saved["batch_size"]  # the first batch is read after
        if saved.get("batch_size") != self.batch_size:
            raise ValueError(
                f"{where} has the global batch size {saved.get('batch_size')}, but "
                f"this run's is {self.batch_size}; resume with the same "
                "config['batch_size'] (the batches would differ otherwise)."
            )
        states = saved["states"]
        if saved.get("rows") == "process":
            if saved.get("process_count") != self.process_count or len(states) != (
                self.process_count
            ):
                raise ValueError(
                    f"{where} holds per-process pipeline states of "
                    f"{saved.get('process_count')} processes, but this run has "
                    f"{self.process_count}: a pipeline sharded by process resumes "
                    "on the same number of processes only. Resume with "
                    f"{saved.get('process_count')} processes, or build a pipeline of "
                    "global batches (every process reads the same pipeline), which "
                    "resumes on any number of processes and devices."
                )
            own = states[self.process_index]
        else:
            own = states[0]
        rows = saved.get("rows")
        self._saved_rows = (str(rows), step) if rows else None
        if self.rows is not None:
            self._check_layout()
        self.close()
        self._cache.clear()
        self.pulled = step
        self.passes, self._in_pass = int(own["pass"]), int(own["in_pass"])
        self._states = {step: dict(own)}


def _allgather_json(value: Any) -> list[Any]:
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


class GrainIter:
    """The iterator `create_input_iter` returns for a Grain input: placed,
    prefetched items of batches from a [`eqx_steps.pipeline.GrainStream`][].

    **Attributes:**

    - `stream`: the `GrainStream` read.
    - `steps_per_epoch`, `num_batches`: the batches of one epoch when the input
        has a length (a `MapDataset`, an `ImageFolderDataset`), else `None`.
    - `batch_size`: the global batch size (when not given, the first batch's
        size, once read).
    - `remainder`: the examples of the smaller last evaluation batch, once the
        pass has been read to its end (0 before, and for training).
    - `steps_per_call`: batches stacked per item.
    - `sharding`: the `NamedSharding` the items are placed with.
    - `step`: the global step (batch number) of the next item yielded.
    """

    def __init__(
        self,
        stream: GrainStream,
        *,
        start_step: int = 0,
        steps_per_call: int = 1,
        size_device_prefetch: int = 2,
        dtype: Any = None,
        image_key: str | None = "image",
    ):
        self.stream = stream
        self.steps_per_epoch = self.num_batches = stream.steps_per_epoch
        self.steps_per_call = steps_per_call
        self.size_device_prefetch = size_device_prefetch
        self.dtype, self.image_key = dtype, image_key
        spec = P(DEVICE_AXIS) if steps_per_call == 1 else P(None, DEVICE_AXIS)
        self.sharding = NamedSharding(device_mesh(), spec)
        self._place = host_placer(self.sharding)
        self._next = start_step  # the step of the next item read from the stream
        self._queue: collections.deque[tuple[int, Any]] = collections.deque()
        self._exhausted = False
        self._done = False  # the consumer reached the end of an evaluation pass

    @property
    def batch_size(self) -> int:
        return self.stream.batch_size or 0  # 0: not given, and no batch read yet

    @property
    def remainder(self) -> int:
        return self.stream.remainder_rows if self._done else 0

    @property
    def step(self) -> int:
        return self._queue[0][0] if self._queue else self._next

    def remainder_batch(self) -> Any:
        """The smaller last batch of an evaluation pass (cast, on the host), once
        the pass was read to its end; else `None` (as `DeviceIter`'s)."""
        if not self._done or self.stream.remainder is None:
            return None
        return cast_batch(self.stream.remainder, self.dtype, self.image_key)

    def _host_item(self) -> Any:
        k, s = self.steps_per_call, self._next
        batches = [self.stream.batch(i) for i in range(s, s + k)]
        self._next += k
        parts = [shard(cast_batch(b, self.dtype, self.image_key)) for b in batches]
        if k == 1:
            return parts[0]
        return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *parts)

    def _fill(self, size: int) -> None:
        while not self._exhausted and len(self._queue) < size:
            start = self._next
            try:
                item = self._host_item()
            except StopIteration:
                self._exhausted = True
                return
            self._queue.append((start, self._place(item)))

    def __iter__(self) -> GrainIter:
        return self

    def __next__(self) -> Any:
        self._fill(max(self.size_device_prefetch, 1))
        if not self._queue:
            self._done = True
            raise StopIteration
        start, item = self._queue.popleft()
        # The consumer is at `start` and reads forwards: older batches are done.
        self.stream.release_before(start)
        self._fill(self.size_device_prefetch)
        return item


def grain_input_iter(
    source: Any,
    batch_size: int | None,
    *,
    train: bool,
    steps_per_call: int,
    size_device_prefetch: int,
    dtype: Any,
    image_key: str | None,
    name: str,
    process_index: int | None = None,
    process_count: int | None = None,
) -> GrainIter:
    """`create_input_iter` for a Grain input (see there)."""
    if batch_size is not None:
        for count, what in (
            (jax.device_count(), "devices (jax.device_count())"),
            (
                jax.process_count() if process_count is None else process_count,
                "processes",
            ),
        ):
            if check_int("batch_size", batch_size) % count:
                raise ValueError(
                    f"`batch_size` = {batch_size} is not divisible by the {count} "
                    f"{what}; use a multiple of {count}."
                )
    stream = GrainStream(
        source,
        batch_size,
        train=train,
        name=name,
        process_index=process_index,
        process_count=process_count,
    )
    return GrainIter(
        stream,
        steps_per_call=steps_per_call,
        size_device_prefetch=size_device_prefetch,
        dtype=dtype,
        image_key=image_key,
    )

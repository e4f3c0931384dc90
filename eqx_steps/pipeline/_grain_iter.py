"""`GrainIter`: what `create_input_iter` returns for a Grain input: items of
`steps_per_call` batches of a [`eqx_steps.pipeline.GrainStream`][], cast, shaped
and placed on the local devices a few items ahead, as `DeviceIter` does for a
dict of arrays."""

from __future__ import annotations

import collections
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .._validate import check_int, is_grain as is_grain
from ..data import cast_batch
from ..parallel import device_mesh, shard
from ..parallel._mesh import host_placer
from ..state import DEVICE_AXIS
from ._grain import GrainStream


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

"""Batches from a user's own iterable (a loader), shaped and cast as
`create_input_iter`'s batches are: what `BasicTrainer` draws from when its
`train_ds` is an iterable of batches rather than a dict of arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .data import cast_batch
from .parallel import shard


class BatchStream:
    """Batches from an iterable (a user's loader), shaped and cast as
    `create_input_iter`'s: what `BasicTrainer` draws from when its `train_ds` is
    an iterable of batches rather than a dict of arrays.

    Each batch is a dict of arrays (or PyTrees of arrays) with a leading example
    axis, this process's share of the global batch. Its leaves are cast as
    `create_input_iter` casts them, reshaped to `(n_local_devices, per_device,
    ...)` by [`eqx_steps.shard`][] and, for `k` steps per call, stacked `k` at a
    time. When the iterable ends, a re-iterable one (a list, a loader object)
    starts a new pass; a one-shot iterator ends the run with a `ValueError`.
    """

    def __init__(
        self,
        batches: Any,
        *,
        dtype: Any,
        image_key: str | None,
        rename: Any = None,
        name: str = "train_ds",
    ):
        self.source = batches
        self.name = name
        self.dtype = dtype
        self.image_key = image_key
        self.rename = rename or (lambda batch: batch)
        self._it = iter(batches)
        self.one_shot = self._it is batches
        self.step = 0
        self.passes = 1
        try:
            first = next(self._it)
        except StopIteration:
            raise ValueError(f"`{name}` yields no batch; pass at least one.") from None
        self.first = self._check(self.rename(first))
        self._pending: list[Any] = [self.first]

    def _check(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"`{self.name}` yielded a {type(batch).__name__}; each batch must be "
                "a dict of arrays such as {'image': x, 'label': y}."
            )
        return dict(batch)

    def _next_host(self) -> dict[str, Any]:
        if self._pending:
            return self._pending.pop()
        try:
            return self._check(self.rename(next(self._it)))
        except StopIteration:
            if self.one_shot:
                raise ValueError(
                    f"`{self.name}` ran out after {self.step} batches, before the run "
                    "ended: pass an iterable that can be read again (a list, a "
                    "loader object), an endless one, or a smaller "
                    "config['num_steps']."
                ) from None
        self.passes += 1
        self._it = iter(self.source)
        return self._check(self.rename(next(self._it)))

    def _prepare(self, batch: dict[str, Any]) -> Any:
        return shard(cast_batch(batch, self.dtype, self.image_key))

    def next_item(self, k: int) -> Any:
        """The next `k` batches, stacked on a new leading axis when `k > 1`."""
        items = [self._prepare(self._next_host()) for _ in range(k)]
        self.step += k
        if k == 1:
            return items[0]
        stack = (
            np.stack
            if all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(items))
            else jnp.stack
        )
        return jax.tree_util.tree_map(lambda *xs: stack(xs), *items)

    def view(self, steps_per_call: int) -> _StreamView:
        """An iterator of items of `steps_per_call` batches from this stream."""
        return _StreamView(self, steps_per_call)


class _StreamView:
    def __init__(self, stream: BatchStream, steps_per_call: int):
        self.stream, self.k = stream, steps_per_call

    @property
    def step(self) -> int:
        return self.stream.step

    def __iter__(self) -> _StreamView:
        return self

    def __next__(self) -> Any:
        return self.stream.next_item(self.k)

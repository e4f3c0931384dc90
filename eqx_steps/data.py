"""Data iterators: batches shuffled per epoch, sharded and prefetched to the devices.

`IterateData` is SCICO's iterator over a dict of arrays, made resumable and
multi-process aware: the permutation of epoch `e` depends only on `(key, e)`, so an
iterator started at any global step yields exactly what an uninterrupted one
would, and in a run of `P` processes process `p` yields its `1/P` slice of every
global batch. `create_input_iter` adds what SCICO's `prepare_data` and Flax's
`prefetch_to_device` do: batches reshaped to `(n_local_devices, per_device, ...)`,
cast, and placed on the local devices a few batches ahead.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from ._iterate_data import HostBatch, IterateData as IterateData
from ._validate import check_int
from .parallel import device_mesh
from .parallel._mesh import host_placer
from .state import DEVICE_AXIS


DeviceBatch = dict[str, Array]


def _casts(name: str, x: np.ndarray) -> bool:
    # Floating entries, and integer (or bool) images: SCICO's iterator casts its
    # images to `dtype`; integer labels (class indices) keep their dtype.
    return jnp.issubdtype(x.dtype, jnp.floating) or (
        name == "image" and not jnp.issubdtype(x.dtype, jnp.complexfloating)
    )


def _target_dtypes(dataset: HostBatch, dtype: Any) -> dict[str, Any]:
    """The dtype each entry of `dataset` is cast to (`None`: kept as it is)."""
    return {
        name: dtype if dtype is not None and _casts(name, x) else None
        for name, x in dataset.items()
    }


def _gather(x: np.ndarray, rows: np.ndarray, dtype: Any) -> np.ndarray:
    """`x[rows]` cast to `dtype` (`None`: kept), in a new array."""
    out = np.take(x, rows, axis=0)
    return out if dtype is None else out.astype(dtype, copy=False)


class DeviceIter:
    """The iterator that `create_input_iter` returns: placed, prefetched batches.

    **Attributes:**

    - `data`: the underlying [`eqx_steps.data.IterateData`][].
    - `steps_per_epoch`, `remainder`, `batch_size`: as for `IterateData`.
    - `num_batches`: the batches yielded per pass: `steps_per_epoch` (training,
        and the full batches of an evaluation pass; the smaller last evaluation
        batch is not sharded but handed over by `remainder_batch()`).
    - `steps_per_call`: batches stacked per item.
    - `sharding`: the `NamedSharding` the batches are placed with.
    - `step`: the global step (batch number) of the next batch yielded; the
        underlying `data` runs `size_device_prefetch` items ahead.
    """

    def __init__(
        self,
        data: IterateData,
        *,
        size_device_prefetch: int,
        dtype: Any,
        steps_per_call: int,
    ):
        self.data = data
        self.steps_per_epoch = self.num_batches = data.steps_per_epoch
        self.remainder = data.remainder
        self.batch_size = data.batch_size
        self.steps_per_call = steps_per_call
        self.size_device_prefetch = size_device_prefetch
        self.dtype = dtype
        mesh = device_mesh()
        spec = P(DEVICE_AXIS) if steps_per_call == 1 else P(None, DEVICE_AXIS)
        self.sharding = NamedSharding(mesh, spec)
        n_local = jax.local_device_count()
        if data.local_batch_size % n_local:
            raise ValueError(
                f"`batch_size` = {data.batch_size} gives {data.local_batch_size} "
                f"rows per process ({data.process_count} processes), not divisible "
                f"by the {n_local} local devices; use a multiple of "
                f"{n_local * data.process_count}."
            )
        per_device = data.local_batch_size // n_local
        self._lead = (
            (n_local, per_device)
            if steps_per_call == 1
            else (steps_per_call, n_local, per_device)
        )
        self._dtypes = _target_dtypes(data.dataset, dtype)
        self._queue: collections.deque[DeviceBatch] = collections.deque()
        self._exhausted = False

    def remainder_batch(self) -> HostBatch | None:
        """The smaller last batch of an evaluation pass, on the host, or `None`.

        The `remainder` examples that do not fill a batch, cast like the other
        batches but neither sharded nor placed: they do not divide over the
        devices, and are meant to be evaluated as one batch on one device (the
        same on every process). `None` when training or when `batch_size`
        divides the dataset.
        """
        if self.data.train or not self.remainder:
            return None
        rows = self.data.indices(self.data.steps_per_epoch)
        return {
            name: _gather(x, rows, self._dtypes[name])
            for name, x in self.data.dataset.items()
        }

    def _host_item(self) -> HostBatch:
        """The next item on the host: each entry gathered once for the item's
        `steps_per_call` batches, cast, and reshaped to the item's layout."""
        data, k = self.data, self.steps_per_call
        # A partial group only happens at the end of an evaluation pass, which
        # never stacks (steps_per_call = 1 there).
        if not data.train and data.step >= self.steps_per_epoch:
            raise StopIteration  # the full batches are done; see remainder_batch()
        parts = [data.indices(s) for s in range(data.step, data.step + k)]
        rows = parts[0] if k == 1 else np.concatenate(parts)
        data.step += k
        return {
            name: _gather(x, rows, self._dtypes[name]).reshape(
                *self._lead, *x.shape[1:]
            )
            for name, x in data.dataset.items()
        }

    def _fill(self, size: int) -> None:
        while not self._exhausted and len(self._queue) < size:
            try:
                item = self._host_item()
            except StopIteration:
                self._exhausted = True
                return
            self._queue.append(host_placer(self.sharding)(item))

    @property
    def step(self) -> int:
        return self.data.step - len(self._queue) * self.steps_per_call

    def __iter__(self) -> DeviceIter:
        return self

    def __next__(self) -> DeviceBatch:
        self._fill(max(self.size_device_prefetch, 1))
        if not self._queue:
            raise StopIteration
        item = self._queue.popleft()
        # Keep `size_device_prefetch` batches on their way to the devices while
        # the caller works on this one.
        self._fill(self.size_device_prefetch)
        return item


def create_input_iter(
    key: PRNGKeyArray | int | None,
    dataset: Mapping[str, ArrayLike],
    batch_size: int,
    size_device_prefetch: int = 2,
    dtype: Any = jnp.float32,
    train: bool = True,
    *,
    steps_per_call: int = 1,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    name: str = "dataset",
) -> DeviceIter:
    """Create an iterator of batches sharded over and prefetched to the local devices.

    Batches come from [`eqx_steps.data.IterateData`][] (same order, same
    per-process slicing). Each entry is reshaped to
    `(n_local_devices, per_device, ...)` (as [`eqx_steps.shard`][]), floating
    entries are cast to `dtype` (integer entries keep their dtype), and the batch
    is placed on the local devices with a `NamedSharding` over the axis
    `"device"`, `size_device_prefetch` batches ahead of the one being used (as
    Flax's `prefetch_to_device`).

    The `"image"` entry is cast to `dtype` whatever its dtype (images of `uint8`
    and other integer dtypes included, as SCICO's iterator casts them): the
    models take floating-point inputs. Other integer entries, such as the class
    indices of a classifier's `"label"`, keep their dtype. Pass the model's
    floating dtype (e.g. `jnp.float64` for a model built with x64 on).

    An evaluation pass (`train=False`) yields the full batches only; when
    `batch_size` does not divide the dataset, the `remainder` last examples,
    which do not divide over the devices, come from `remainder_batch()` as one
    unsharded host batch (see [`eqx_steps.evaluate_dataset`][], which evaluates
    them on one device).

    With `steps_per_call = K > 1`, each item stacks `K` consecutive batches on a
    new leading axis, `(K, n_local_devices, per_device, ...)`, for
    `parallel_train_step(..., steps_per_call=K)`.

    **Arguments:**

    - `key`: a PRNG key or int seed for the shuffling (training only).
    - `dataset`: a dict of arrays with equal leading length.
    - `batch_size`: the global batch size; a multiple of `jax.device_count()`.
    - `size_device_prefetch`: batches placed ahead (0 places each when asked).
    - `dtype`: dtype of the floating entries and of `"image"` (`None` keeps them
        as they are).
    - `train`: infinite shuffled iteration, or one ordered pass.
    - `steps_per_call`: batches per item (training only).
    - `start_step`: global step (training) or batch number (evaluation) to start at.
    - `process_index`, `process_count`, `name`: as for `IterateData`.

    **Returns:**

    A [`eqx_steps.data.DeviceIter`][] yielding dicts of JAX arrays; it exposes
    `steps_per_epoch`, `num_batches` (counted in batches, not items), `remainder`
    and `remainder_batch()`.
    """
    k = check_int("steps_per_call", steps_per_call)
    if not train and k != 1:
        raise ValueError(
            f"`steps_per_call` = {k} applies to training only; evaluation takes one "
            "batch per call: pass steps_per_call=1 with train=False."
        )
    prefetch = check_int("size_device_prefetch", size_device_prefetch, minimum=0)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"`dtype` = {dtype} is not a floating dtype; it is the dtype of the "
                "floating entries: pass e.g. jnp.float32 or jnp.bfloat16 (or None)."
            )
    data = IterateData(
        dataset,
        batch_size,
        train,
        key,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        name=name,
    )
    return DeviceIter(
        data, size_device_prefetch=prefetch, dtype=dtype, steps_per_call=k
    )

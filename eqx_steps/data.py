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
from typing import Any, TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import PRNGKeyArray

from ._iterate_data import HostBatch, IterateData as IterateData
from ._validate import check_int, is_grain, is_integer_image
from .parallel import device_mesh
from .parallel._mesh import host_placer
from .state import DEVICE_AXIS


if TYPE_CHECKING:
    from .pipeline import GrainIter

DeviceBatch = dict[str, Any]


def _target_dtypes(
    dataset: HostBatch, dtype: Any, image_key: str | None
) -> dict[str, list[Any]]:
    """The dtype each leaf of each entry of `dataset` is cast to (`None`: kept):
    floating leaves to `dtype`, the integer image `image_key` (SCICO's cast)
    too; integer, boolean and complex leaves otherwise keep theirs."""
    out = {}
    for name, entry in dataset.items():
        if dtype is not None and name == image_key and is_integer_image(entry):
            out[name] = [dtype]
            continue
        out[name] = [
            dtype if dtype is not None and np.issubdtype(x.dtype, np.floating) else None
            for x in jax.tree_util.tree_leaves(entry)
        ]
    return out


def _gather(
    entry: Any, rows: np.ndarray, dtypes: list[Any], lead: tuple[int, ...] | None = None
) -> Any:
    """`entry[rows]` for every leaf, cast to its dtype (`None`: kept) and, with
    `lead`, reshaped to `(*lead, ...)`, in new arrays."""
    leaves, treedef = jax.tree_util.tree_flatten(entry)
    out = []
    for x, dtype in zip(leaves, dtypes):
        y = np.take(x, rows, axis=0)
        y = y if dtype is None else y.astype(dtype, copy=False)
        out.append(y if lead is None else y.reshape(*lead, *x.shape[1:]))
    return jax.tree_util.tree_unflatten(treedef, out)


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
        image_key: str | None = "image",
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
        self._dtypes = _target_dtypes(data.dataset, dtype, image_key)
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
            name: _gather(x, rows, self._dtypes[name], self._lead)
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
    dataset: Mapping[str, Any] | Any,
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
    shuffle: bool = True,
    image_key: str | None = "image",
) -> DeviceIter | GrainIter:
    """Create an iterator of batches sharded over and prefetched to the local devices.

    Batches come from [`eqx_steps.data.IterateData`][] (same order, same
    per-process slicing). Each entry is reshaped to
    `(n_local_devices, per_device, ...)` (as [`eqx_steps.shard`][]), floating
    entries are cast to `dtype` (integer entries keep their dtype), and the batch
    is placed on the local devices with a `NamedSharding` over the axis
    `"device"`, `size_device_prefetch` batches ahead of the one being used (as
    Flax's `prefetch_to_device`).

    An entry may be a PyTree of arrays (a tuple or dict of a model's several
    inputs): each leaf is handled as an array entry is.

    Integer and boolean leaves keep their dtype (token ids, class indices,
    masks), with one exception, SCICO's: the `image_key` entry (`"image"`) is
    cast to `dtype` when it is an integer image, a single array of an unsigned
    dtype (`uint8` pixels) or with at least two axes per example (`(H, W)`,
    `(H, W, C)`): the image models take floating-point inputs. Pass
    `image_key=None` to keep every integer entry as it is. Pass the model's
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
    - `dataset`: a dict of arrays (or PyTrees of arrays) with equal leading
        length; or a Grain `MapDataset`, `IterDataset` or `DataLoader` whose
        elements are such dicts, one global batch each (see the "Data
        pipelines" page): then `key`, `shuffle` and `start_step` (0) do not
        apply, the pipeline orders its batches itself, and a
        [`eqx_steps.pipeline.GrainIter`][] is returned.
    - `batch_size`: the global batch size; a multiple of `jax.device_count()`.
    - `size_device_prefetch`: batches placed ahead (0 places each when asked).
    - `dtype`: dtype of the floating leaves and of an integer image (`None`
        keeps them as they are).
    - `train`: infinite shuffled iteration, or one ordered pass.
    - `steps_per_call`: batches per item (training only).
    - `start_step`: global step (training) or batch number (evaluation) to start at.
    - `process_index`, `process_count`, `name`, `shuffle`: as for `IterateData`.
    - `image_key`: the entry cast to `dtype` when it is an integer image (see
        above), or `None`.

    **Returns:**

    A [`eqx_steps.data.DeviceIter`][] (for a Grain input, a
    [`eqx_steps.pipeline.GrainIter`][]) yielding dicts of JAX arrays; it exposes
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
    if is_grain(dataset):
        from .pipeline._grain_iter import grain_input_iter  # imports Grain's users only

        if start_step:
            raise ValueError(
                f"`start_step` = {start_step} with a Grain input: a Grain input is "
                "read from where its iterator is, not from a step; to resume, "
                "restore its checkpointed state (BasicTrainer does)."
            )
        return grain_input_iter(
            dataset,
            batch_size,
            train=train,
            steps_per_call=k,
            size_device_prefetch=prefetch,
            dtype=dtype,
            image_key=image_key,
            name=name,
            process_index=process_index,
            process_count=process_count,
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
        shuffle=shuffle,
    )
    return DeviceIter(
        data,
        size_device_prefetch=prefetch,
        dtype=dtype,
        steps_per_call=k,
        image_key=image_key,
    )


def cast_batch(batch: Mapping[str, Any], dtype: Any, image_key: str | None) -> Any:
    """`batch` with its leaves cast as `create_input_iter` casts them: floating
    leaves to `dtype`, the integer image `image_key` too, others kept (`dtype =
    None`: all kept)."""
    out = {}
    for name, entry in batch.items():
        image = dtype is not None and name == image_key
        if image and is_integer_image(entry):
            out[name] = entry.astype(dtype)
            continue

        def cast(x: Any) -> Any:
            floating = jnp.issubdtype(x.dtype, jnp.floating)
            if dtype is None or not floating or x.dtype == dtype:
                return x
            return x.astype(dtype)

        out[name] = jax.tree_util.tree_map(cast, entry)
    return out

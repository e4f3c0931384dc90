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

from ._validate import check_int, nearest_multiples
from .parallel import device_mesh, shard
from .state import DEVICE_AXIS


HostBatch = dict[str, np.ndarray]
DeviceBatch = dict[str, Array]


def _seed_words(given: object) -> tuple[int, ...]:
    """The integers that seed the per-epoch permutations, from a PRNG key."""
    key: Any = given
    if key is None:
        key = jax.random.key(0)
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = jax.random.key(int(key))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"`key` must be a single PRNG key, got a key array of shape "
                f"{key.shape}; pass e.g. `jax.random.key(0)`."
            )
        key = jax.random.key_data(key)
    words = np.asarray(key)
    if words.dtype != np.uint32 or words.ndim != 1:
        raise TypeError(
            f"`key` must be a PRNG key (`jax.random.key(seed)`), an int seed or None, "
            f"got {given!r}."
        )
    return tuple(int(w) for w in words)


def _as_host_dataset(dataset: Any, name: str) -> dict[str, np.ndarray]:
    if not isinstance(dataset, Mapping):
        raise TypeError(
            f"`{name}` must be a dict of arrays with equal leading length, got "
            f"{type(dataset).__name__}; build it as "
            "{'image': inputs, 'label': targets}."
        )
    if not dataset:
        raise ValueError(
            f"`{name}` is an empty dict; it needs at least one array, e.g. "
            "{'image': inputs, 'label': targets}."
        )
    host = {}
    for key, value in dataset.items():
        if not isinstance(key, str):
            raise TypeError(
                f"`{name}` keys must be strings, got {key!r}; use names such as "
                "'image' and 'label'."
            )
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(
                f"`{name}[{key!r}]` is a scalar; every entry needs a leading "
                "example axis (shape (n_examples, ...))."
            )
        host[key] = array
    lengths = {k: x.shape[0] for k, x in host.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k!r}: {n}" for k, n in lengths.items())
        raise ValueError(
            f"`{name}` entries have different leading lengths ({listed}); every "
            "array must hold one row per example: trim or fix the entries so the "
            "lengths agree."
        )
    return host


class IterateData:
    """Iterate over a dataset in batches (SCICO's `IterateData`), resumably.

    For training (`train=True`) the iterator is infinite: each epoch visits the
    examples in a new random order, in `steps_per_epoch = n // batch_size` batches,
    dropping the last incomplete batch (as SCICO does). The order of epoch `e`
    depends only on `key` and `e`, so the iterator can start at any global step
    (`start_step`) and yields what an uninterrupted one would from there.

    For evaluation (`train=False`) it passes once over the data in order, in
    `num_batches = ceil(n / batch_size)` batches, then stops: `steps_per_epoch`
    full batches, then, when `batch_size` does not divide `n`, the `remainder`
    last examples as one smaller batch of their own (no padding), so that every
    example counts exactly once (SCICO's evaluation, which drops them, extended).

    `batch_size` is the **global** batch size: in a run of `P` processes
    (`jax.process_count()`), process `p` yields rows `[p*B/P, (p+1)*B/P)` of each
    global batch, the global order being that of a one-process run. The smaller
    last evaluation batch is the exception: every process yields all of it (it is
    evaluated on one device of each process, the same on every process).

    Batches are dicts of host (`numpy`) arrays with the dataset's keys and dtypes.

    **Arguments:**

    - `dataset`: a dict of arrays (numpy or JAX) with equal leading length.
    - `batch_size`: the global batch size; a multiple of `jax.device_count()`.
    - `train`: infinite shuffled iteration (`True`) or one ordered pass (`False`).
    - `key`: a PRNG key (`jax.random.key(seed)`) or int seed for the shuffling;
        `None` means `jax.random.key(0)`. Unused when `train=False`.
    - `start_step`: the global step (training) or batch number (evaluation) to
        start at.
    - `process_index`, `process_count`: override `jax.process_index()` and
        `jax.process_count()` (for tests of the per-process slicing).
    - `name`: how the caller names `dataset` in error messages (e.g. `"test_ds"`).

    **Attributes:**

    - `steps_per_epoch`: `n // batch_size`, the full batches per pass.
    - `remainder`: `n - steps_per_epoch * batch_size`, the examples that do not
        fill a batch (training leaves them out of each epoch; evaluation yields
        them last, as one smaller batch).
    - `num_batches`: batches per pass: `steps_per_epoch` for training,
        `ceil(n / batch_size)` for evaluation.
    - `local_batch_size`: rows per batch yielded by this process.
    - `step`: the global step (batch number) of the next batch.

    !!! example

        ```python
        ds = IterateData({"image": x, "label": y}, 32, key=jax.random.key(0))
        batch = next(ds)  # {"image": (32, ...), "label": (32, ...)}
        ```
    """

    def __init__(
        self,
        dataset: Mapping[str, ArrayLike],
        batch_size: int,
        train: bool = True,
        key: PRNGKeyArray | int | None = None,
        *,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        name: str = "dataset",
    ):
        self.name = name
        self.dataset = _as_host_dataset(dataset, name)
        self.batch_size = check_int("batch_size", batch_size)
        self.train = bool(train)
        self.n = next(iter(self.dataset.values())).shape[0]

        n_devices = jax.device_count()
        if self.batch_size % n_devices:
            raise ValueError(
                f"`batch_size` = {self.batch_size} is not divisible by the "
                f"{n_devices} devices (jax.device_count()); use a multiple of "
                f"{n_devices}, e.g. {nearest_multiples(self.batch_size, n_devices)}."
            )
        pcount = jax.process_count() if process_count is None else process_count
        self.process_count = check_int("process_count", pcount)
        pindex = jax.process_index() if process_index is None else process_index
        self.process_index = check_int("process_index", pindex, minimum=0)
        if self.process_index >= self.process_count:
            raise ValueError(
                f"`process_index` = {self.process_index} must be less than "
                f"`process_count` = {self.process_count}."
            )
        if self.batch_size % self.process_count:
            raise ValueError(
                f"`batch_size` = {self.batch_size} is not divisible by the "
                f"{self.process_count} processes; use a multiple of "
                f"{self.process_count}, e.g. "
                f"{nearest_multiples(self.batch_size, self.process_count)}."
            )
        self.local_batch_size = self.batch_size // self.process_count

        self.steps_per_epoch = self.n // self.batch_size
        self.remainder = self.n - self.steps_per_epoch * self.batch_size
        if self.train:
            if self.steps_per_epoch == 0:
                raise ValueError(
                    f"`{name}` has {self.n} examples, fewer than one batch of "
                    f"`batch_size` = {self.batch_size}; training drops incomplete "
                    "batches, so use a batch size of at most "
                    f"{(self.n // n_devices) * n_devices or n_devices} or more data."
                )
            self.num_batches = self.steps_per_epoch
        else:
            if self.n == 0:
                raise ValueError(
                    f"`{name}` has no examples to evaluate on; pass at least one "
                    "example."
                )
            self.num_batches = -(-self.n // self.batch_size)

        self._seed = _seed_words(key) if self.train else ()
        self._epoch = -1
        self._perm = np.arange(0)
        self.step = 0
        self.reset(start_step)

    def reset(self, start_step: int = 0) -> None:
        """Continue from `start_step`: a global step (training) or batch number."""
        start_step = check_int("start_step", start_step, minimum=0)
        if not self.train and start_step > self.num_batches:
            raise ValueError(
                f"`start_step` = {start_step} is past the {self.num_batches} "
                "evaluation batches; use 0 to evaluate on all of them."
            )
        self.step = start_step

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the examples in training epoch `epoch` (a function of `key`)."""
        rng = np.random.default_rng(np.random.SeedSequence([*self._seed, epoch]))
        return rng.permutation(self.n)

    def _indices(self, step: int) -> np.ndarray:
        """The rows of the dataset that this process yields at `step`."""
        b = self.batch_size
        if not self.train and step >= self.steps_per_epoch:
            # The smaller last evaluation batch: all of it, on every process.
            return np.arange(self.steps_per_epoch * b, self.n)
        lo = self.process_index * self.local_batch_size
        rows = slice(lo, lo + self.local_batch_size)
        if not self.train:
            return np.arange(step * b, (step + 1) * b)[rows]
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm, self._epoch = self.permutation(epoch), epoch
        return self._perm[j * b : (j + 1) * b][rows]

    def batch(self, step: int) -> HostBatch:
        """The batch of global step (training) or batch number (evaluation) `step`.

        As yielded by the iterator: this process's rows only, except the smaller
        last evaluation batch, which every process gets whole.
        """
        idx = self._indices(step)
        return {name: x[idx] for name, x in self.dataset.items()}

    def __iter__(self) -> IterateData:
        return self

    def __next__(self) -> HostBatch:
        if not self.train and self.step >= self.num_batches:
            raise StopIteration
        batch = self.batch(self.step)
        self.step += 1
        return batch


def _casts(name: str, x: np.ndarray) -> bool:
    # Floating entries, and integer (or bool) images: SCICO's iterator casts its
    # images to `dtype`; integer labels (class indices) keep their dtype.
    return jnp.issubdtype(x.dtype, jnp.floating) or (
        name == "image" and not jnp.issubdtype(x.dtype, jnp.complexfloating)
    )


def _cast(batch: HostBatch, dtype: Any) -> HostBatch:
    if dtype is None:
        return batch
    return {
        name: x.astype(dtype) if _casts(name, x) else x for name, x in batch.items()
    }


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
        return _cast(self.data.batch(self.data.steps_per_epoch), self.dtype)

    def _host_item(self) -> HostBatch:
        if not self.data.train and self.data.step >= self.steps_per_epoch:
            raise StopIteration  # the full batches are done; see remainder_batch()
        if self.steps_per_call == 1:
            return shard(_cast(next(self.data), self.dtype))
        # A partial group only happens at the end of an evaluation pass, which
        # never stacks (steps_per_call = 1 there), so `next` raising is the end.
        group = [
            shard(_cast(next(self.data), self.dtype))
            for _ in range(self.steps_per_call)
        ]
        return {name: np.stack([b[name] for b in group]) for name in group[0]}

    def _fill(self, size: int) -> None:
        while not self._exhausted and len(self._queue) < size:
            try:
                item = self._host_item()
            except StopIteration:
                self._exhausted = True
                return
            self._queue.append(jax.device_put(item, self.sharding))

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
    n_local = jax.local_device_count()
    if data.local_batch_size % n_local:
        raise ValueError(
            f"`batch_size` = {data.batch_size} gives {data.local_batch_size} rows "
            f"per process ({data.process_count} processes), not divisible by the "
            f"{n_local} local devices; use a multiple of "
            f"{n_local * data.process_count}."
        )
    return DeviceIter(
        data, size_device_prefetch=prefetch, dtype=dtype, steps_per_call=k
    )


__all__ = ["IterateData", "DeviceIter", "create_input_iter"]

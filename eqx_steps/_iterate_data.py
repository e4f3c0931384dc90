"""`IterateData`: SCICO's iterator over a dict of arrays, resumable and
multi-process aware (host batches; `eqx_steps.data` places them on the devices)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PRNGKeyArray

from ._validate import check_bool, check_int, nearest_multiples


HostBatch = dict[str, Any]
"""A batch on the host: a dict whose entries are NumPy arrays or PyTrees of them."""


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


def _leaf_name(name: str, key: str, path: tuple) -> str:
    return f"{name}[{key!r}]{jax.tree_util.keystr(path)}"


def host_leaf(label: str, value: Any) -> np.ndarray:
    """One leaf of a dataset or batch as a host array with a leading example axis.

    Arrays (NumPy, JAX) and NumPy scalars' arrays pass; anything else (a string,
    an object, a Python number) raises a `TypeError` naming `label`.
    """
    if not (isinstance(value, (np.ndarray, jax.Array, np.generic))):
        raise TypeError(
            f"`{label}` is a {type(value).__name__} ({value!r:.60}), not an array; "
            "every leaf of a dataset or batch must be an array with a leading "
            "example axis (NumPy or JAX): convert it with np.asarray, or keep it "
            "out of the data (e.g. as a static field of the model)."
        )
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "USV":
        raise TypeError(
            f"`{label}` has dtype {array.dtype}; the leaves of a dataset must be "
            "numeric or boolean arrays (encode strings as integer ids first)."
        )
    if array.ndim == 0:
        raise ValueError(
            f"`{label}` is a scalar; every entry needs a leading "
            "example axis (shape (n_examples, ...))."
        )
    return array


def _as_host_dataset(dataset: Any, name: str) -> dict[str, Any]:
    if not isinstance(dataset, Mapping):
        raise TypeError(
            f"`{name}` must be a dict of arrays with equal leading length, got "
            f"{type(dataset).__name__}; build it as "
            "{'image': inputs, 'label': targets} (an entry may be a tuple or dict "
            "of arrays, for a model with several inputs)."
        )
    if not dataset:
        raise ValueError(
            f"`{name}` is an empty dict; it needs at least one array, e.g. "
            "{'image': inputs, 'label': targets}."
        )
    host = {}
    lengths = {}
    for key, value in dataset.items():
        if not isinstance(key, str):
            raise TypeError(
                f"`{name}` keys must be strings, got {key!r}; use names such as "
                "'image' and 'label'."
            )
        if isinstance(value, (list, int, float, complex, str, bytes)):
            value = np.asarray(value)  # SCICO's datasets: array-likes per entry
        leaves, treedef = jax.tree_util.tree_flatten_with_path(value)
        if not leaves:
            raise ValueError(
                f"`{name}[{key!r}]` holds no array ({value!r:.60}); give every "
                "entry at least one array with a leading example axis."
            )
        arrays = []
        for path, leaf in leaves:
            label = _leaf_name(name, key, path)
            array = host_leaf(label, leaf)
            lengths[f"{key!r}{jax.tree_util.keystr(path)}"] = array.shape[0]
            arrays.append(array)
        host[key] = jax.tree_util.tree_unflatten(treedef, arrays)
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise ValueError(
            f"`{name}` entries have different leading lengths ({listed}); every "
            "array must hold one row per example: trim or fix the entries so the "
            "lengths agree."
        )
    return host


def take(tree: Any, rows: np.ndarray) -> Any:
    """The `rows` of every leaf of `tree` (a host dataset entry or dataset)."""
    return jax.tree_util.tree_map(lambda x: np.take(x, rows, axis=0), tree)


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
    An entry may be any PyTree of arrays (a tuple or dict of inputs for a model
    with several inputs); every leaf is indexed along its leading axis, and the
    batch has the same structure.

    **Arguments:**

    - `dataset`: a dict of arrays (numpy or JAX), or of PyTrees of arrays, with
        equal leading length.
    - `batch_size`: the global batch size; a multiple of `jax.device_count()`.
    - `train`: infinite shuffled iteration (`True`) or one ordered pass (`False`).
    - `key`: a PRNG key (`jax.random.key(seed)`) or int seed for the shuffling;
        `None` means `jax.random.PRNGKey(0)` (SCICO's default). Unused when
        `train=False` or `shuffle=False`.
    - `shuffle`: visit the examples of each training epoch in a new random order
        (default, SCICO's), or in their order in `dataset` every epoch.
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
    - `key`: the key of the shuffling (SCICO's `IterateData.key`): the one
        given, or `jax.random.PRNGKey(0)` when none is (as SCICO).

    !!! example

        ```python
        ds = IterateData({"image": x, "label": y}, 32, key=jax.random.key(0))
        batch = next(ds)  # {"image": (32, ...), "label": (32, ...)}
        ```
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        batch_size: int,
        train: bool = True,
        key: PRNGKeyArray | int | None = None,
        *,
        shuffle: bool = True,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        name: str = "dataset",
    ):
        self.name = name
        self.dataset = _as_host_dataset(dataset, name)
        self.batch_size = check_int("batch_size", batch_size)
        self.train = bool(train)
        # SCICO: `PRNGKey(0)` when no key is given (the same permutations as
        # `jax.random.key(0)`: both hold the words [0, 0]).
        self.key = jax.random.PRNGKey(0) if key is None else key
        self.shuffle = check_bool("shuffle", shuffle)
        self.n = jax.tree_util.tree_leaves(self.dataset)[0].shape[0]

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
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng(np.random.SeedSequence([*self._seed, epoch]))
        return rng.permutation(self.n)

    def indices(self, step: int) -> np.ndarray:
        """The rows of `dataset` in the batch of global step (training) or batch
        number (evaluation) `step`: this process's rows, except for the smaller
        last evaluation batch, which every process gets whole (see `batch`)."""
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
        return take(self.dataset, self.indices(step))

    def __iter__(self) -> IterateData:
        return self

    def __next__(self) -> HostBatch:
        if not self.train and self.step >= self.num_batches:
            raise StopIteration
        batch = self.batch(self.step)
        self.step += 1
        return batch

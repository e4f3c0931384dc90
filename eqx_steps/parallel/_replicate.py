"""SCICO-style helpers for users' own pmaps: replicate, unreplicate, shard, sync.

The parallel steps of this library need none of them: they take an ordinary
state and place it themselves. `shard` also serves them: it gives a local batch
the leading device axis they expect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from .._validate import check_divisible
from ..state import DEVICE_AXIS, TrainState
from ._mesh import check_devices, device_mesh


def replicate(tree: PyTree, devices: Sequence[Any] | None = None) -> PyTree:
    """Give every array leaf a leading device axis, one copy per device.

    For users' own `eqx.filter_pmap`/`jax.pmap` loops, as SCICO's `replicate`;
    the parallel steps of this library do not need it (and refuse a replicated
    state). Non-array leaves are left as they are.

    **Arguments:**

    - `tree`: any PyTree, e.g. a `TrainState`.
    - `devices`: the devices to replicate onto (default: all local devices).

    **Returns:**

    The PyTree with each array leaf of shape `(n_devices, *shape)`, laid out one
    slice per device.
    """
    mesh = device_mesh(devices)
    n = mesh.devices.size
    sharding = NamedSharding(mesh, P(DEVICE_AXIS))

    def rep(x):
        if not eqx.is_array(x):
            return x
        x = jnp.asarray(x)
        return jax.device_put(jnp.broadcast_to(x[None], (n, *x.shape)), sharding)

    return jax.tree_util.tree_map(rep, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """Take the first device's copy of every array leaf (undo `replicate`).

    **Arguments:**

    - `tree`: a PyTree whose array leaves have a leading device axis.

    **Returns:**

    The PyTree without the leading device axis.
    """
    return jax.tree_util.tree_map(lambda x: x[0] if eqx.is_array(x) else x, tree)


def _split_leading(x: Any, n: int) -> Any:
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


_RESHAPERS: dict[Any, Callable[..., tuple[Any, ...]]] = {}  # per device list


def _reshaper(devices: Sequence[Any] | None) -> Callable[..., tuple[Any, ...]]:
    """One compiled call for every JAX leaf: reshaped to `(n, per_device, ...)` and
    laid out one slice per device with the very sharding the parallel steps place
    a batch with (`out_shardings`, not a constraint, which on one device gives
    `P()`), so that a step takes them as they are."""
    key = None if devices is None else tuple(devices)
    fn = _RESHAPERS.get(key)
    if fn is None:
        mesh = device_mesh(devices)
        n = mesh.devices.size
        fn = jax.jit(
            lambda *xs: tuple(_split_leading(x, n) for x in xs),
            out_shardings=NamedSharding(mesh, P(DEVICE_AXIS)),
        )
        _RESHAPERS[key] = fn
    return fn


_ONE_CPU: dict[Any, bool] = {}  # per sharding: one CPU device?


def _host_view(x: jax.Array) -> Any:
    """`x` as a NumPy array when it is a JAX array on one CPU device (a view of
    its buffer), else `x`."""
    # Several CPU devices: a JAX array in this process's CPU memory is read as a
    # NumPy array (no copy). This runs once per leaf and step: the answer is
    # kept per sharding (a process holds only a few).
    sharding = x.sharding
    one_cpu = _ONE_CPU.get(sharding)
    if one_cpu is None:
        devices = sharding.device_set
        one_cpu = len(devices) == 1 and next(iter(devices)).platform == "cpu"
        _ONE_CPU[sharding] = one_cpu
    if not one_cpu or x.is_deleted():
        return x
    return np.asarray(x)


def shard(batch: PyTree, devices: Sequence[Any] | None = None) -> PyTree:
    """Reshape a local batch `(local_batch, ...)` to `(n_devices, per_device, ...)`.

    A batch is any PyTree of arrays with a leading example axis (a dict of
    arrays, a tuple of a model's several inputs, a dict of dicts...). NumPy
    leaves are reshaped on the host: the parallel steps place them within their
    own compiled call. JAX leaves are reshaped and laid out one slice per device
    in one compiled call, in the layout the parallel steps expect, so that a step
    takes them as they are; on several CPU devices, JAX leaves held on one CPU
    device are read as NumPy arrays (without a copy) and take the NumPy path.

    **Arguments:**

    - `batch`: a PyTree of arrays with equal leading size, divisible by the number
        of devices.
    - `devices`: the devices the batch is for (default: all local devices); only
        their number matters.

    **Returns:**

    The same PyTree with each leaf reshaped to `(n_devices, per_device, ...)`.

    **Raises:**

    `TypeError` naming a leaf that is not an array; `ValueError` naming a leaf
    that is a scalar or whose leading size does not divide over the devices.
    """
    if devices is None:
        n, what = jax.local_device_count(), "local devices"
    else:
        n, what = len(check_devices("devices", devices)), "devices"

    # This runs once per step in a training loop. JAX leaves go to the step
    # through one compiled call (no wait for their values: a batch just
    # transferred stays asynchronous), except on several CPU devices, where a
    # leaf on one CPU device is read as a NumPy array (a view: the step's own
    # call splits it over the devices, quicker than a second launch on each).
    # Host leaves are reshaped. Any fault goes to `_check_leaves`, which names
    # the leaf by its path.
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    if not leaves:
        _check_leaves(batch, n, what)
    one_process = jax.process_count() == 1
    if (
        n == 1
        and one_process
        and all(isinstance(x, jax.Array) and x.ndim and not x.committed for x in leaves)
    ):  # the common case of an Equinox loop on one device: no pass below
        return treedef.unflatten(_reshaper(devices)(*leaves))
    out: list[Any] = []
    on_device: list[int] = []  # JAX leaves: one compiled call below
    for x in leaves:
        if type(x) is not np.ndarray:
            if isinstance(x, jax.Array):
                if n > 1 or x.committed:
                    x = _host_view(x)
            elif not isinstance(x, (np.ndarray, np.generic)):
                _check_leaves(batch, n, what)
        shape: tuple[int, ...] = x.shape
        if not shape or shape[0] % n:
            _check_leaves(batch, n, what)
        if isinstance(x, jax.Array):
            on_device.append(len(out))
            out.append(x)
        else:
            out.append(x.reshape(n, shape[0] // n, *shape[1:]))
    if on_device:
        placed = None
        if one_process and not any(out[i].committed for i in on_device):
            placed = _reshaper(devices)(*(out[i] for i in on_device))
        for j, i in enumerate(on_device):
            out[i] = _split_leading(out[i], n) if placed is None else placed[j]
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_leaves(batch: PyTree, n: int, what: str) -> NoReturn:
    """Raise the error that names the first leaf of `batch` `shard` refuses."""
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(
            f"`batch` holds no array ({batch!r:.60}); pass a PyTree of arrays with a "
            "leading batch axis, e.g. {'image': x, 'label': y}."
        )
    for path, x in leaves:
        name = f"batch{jax.tree_util.keystr(path)}"
        if not isinstance(x, (np.ndarray, jax.Array, np.generic)):
            raise TypeError(
                f"`{name}` is a {type(x).__name__} ({x!r:.60}), not an array; every "
                "leaf of a batch must be a NumPy or JAX array with a leading batch "
                "axis."
            )
        if x.ndim == 0:
            raise ValueError(
                f"`{name}` is a scalar; every leaf of a batch needs a leading batch "
                "axis."
            )
        check_divisible(f"{name}.shape[0]", x.shape[0], n, what)
    raise AssertionError("`_check_leaves` is called for a batch it refuses")


def sync_model_state(replicated_state: TrainState) -> TrainState:
    """Average the floating-point leaves of `model_state` over the device axis.

    For a state replicated with [`eqx_steps.replicate`][] and trained with a user's
    own pmap (SCICO's `sync_batch_stats`). The parallel steps of this library do
    this inside every step, so their states never need it.

    **Arguments:**

    - `replicated_state`: a `TrainState` whose array leaves carry a leading device
        axis.

    **Returns:**

    The state with each floating leaf of `model_state` replaced by its mean over
    the devices (still one copy per device).
    """

    def mean(x):
        if not eqx.is_inexact_array(x):
            return x
        m = jnp.broadcast_to(jnp.mean(x, axis=0, keepdims=True), x.shape)
        return jax.device_put(m, x.sharding) if isinstance(x, jax.Array) else m

    model_state = jax.tree_util.tree_map(mean, replicated_state.model_state)
    return replicated_state.replace(model_state=model_state)

"""Devices, the mesh, and placement: where a parallel step puts its inputs.

The one place that builds the device mesh ([`eqx_steps.device_mesh`][]) and the
one place that puts a state (replicated on every device of the mesh) and a batch
(split over the devices along its device axis) where a compiled step expects
them, on one process or across several.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..state import DEVICE_AXIS


def check_devices(name: str, devices: Any, *, local: bool = False) -> tuple:
    """`devices` as a tuple, checked to be distinct JAX devices (this process's
    own when `local`); `TypeError`/`ValueError` naming `name` otherwise."""
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(
            f"`{name}` must be a sequence of JAX devices, got {devices!r}; pass e.g. "
            "jax.local_devices()[:2]."
        )
    devices = tuple(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(
            f"`{name}` must be a non-empty sequence of JAX devices, got {devices!r}; "
            "pass e.g. jax.local_devices()[:2]."
        )
    if len(set(devices)) != len(devices):
        raise ValueError(
            f"`{name}` = {devices!r} lists a device twice; list each once."
        )
    if local:
        others = [d for d in devices if d.process_index != jax.process_index()]
        if others:
            raise ValueError(
                f"`{name}` holds devices of other processes ({others}); "
                "backend='pmap' runs on this process's devices "
                "(jax.local_devices()): use backend='sharded' across processes."
            )
    return devices


def device_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """The one-axis mesh, axis `"device"`, that the parallel steps run over.

    Every batch placement and replicated state of this library is laid out on a
    mesh built here.

    **Arguments:**

    - `devices`: the devices, in order (default: this process's devices,
        `jax.local_devices()`; pass `jax.devices()` for every process's).

    **Returns:**

    A `jax.sharding.Mesh` with the single axis `eqx_steps.DEVICE_AXIS`.
    """
    if devices is None:
        devices = jax.local_devices()
    devices = check_devices("devices", devices)
    return Mesh(np.asarray(devices, dtype=object), (DEVICE_AXIS,))


@functools.cache
def host_placer(sharding: NamedSharding) -> Callable[[Any], Any]:
    """How host arrays (a PyTree of them) go to `sharding`'s local devices.

    In a one-process run, through a jitted identity: jit's C++ dispatch
    transfers its arguments ~7x faster than `jax.device_put`'s Python path on one
    XLA:CPU device (10 us against 70 us for a small batch), and as fast as it on
    several. A multi-process run's jit refuses host arrays with a sharding that
    is not replicated: there, `jax.device_put`.
    """
    if jax.process_count() > 1:
        return functools.partial(jax.device_put, device=sharding)
    return jax.jit(lambda tree: tree, in_shardings=sharding, out_shardings=sharding)


@functools.cache
def _copy_on(sharding: NamedSharding) -> Callable[[list[Any]], list[jax.Array]]:
    """A compiled copy of a list of arrays laid out as `sharding` (new buffers)."""
    return jax.jit(
        lambda xs: [jnp.copy(x) for x in xs],
        in_shardings=sharding,
        out_shardings=sharding,
    )


class Placement:
    """Where one parallel step puts its inputs on `mesh`.

    The state: every array on every device of the mesh (`P()`). The batch: split
    over the devices along its device axis, axis 0 for one step per call
    (`(n_devices, per_device, ...)`), axis 1 for several
    (`(steps_per_call, n_devices, per_device, ...)`). Each process passes the
    batch of its own devices; across processes the global arrays are assembled
    from them.
    """

    def __init__(self, mesh: Mesh, steps_per_call: int):
        self.mesh = mesh
        self.device_axis = 0 if steps_per_call == 1 else 1
        n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        self.lead = (n_local,) if steps_per_call == 1 else (steps_per_call, n_local)
        self.state_sharding = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(
            mesh, P(*([None] * self.device_axis), DEVICE_AXIS)
        )
        self._one_process = jax.process_count() == 1

    @property
    def in_shardings(self) -> Any:
        """The step's `jax.jit` `in_shardings`: the state's arrays as they come
        (placed by [`Placement.state`][]), the batch split over the devices. With
        them, jit's C++ dispatch puts a NumPy batch where the step reads it, so a
        host batch costs no separate placement call. Multi-process runs pass
        global arrays assembled by [`Placement.batch`][]."""
        return (None, self.batch_sharding)

    def prepare(self, batch: Any) -> Any:
        """`batch`, checked ([`Placement.check_batch`][]) and placed
        ([`Placement.batch`][]), for the step's call.

        The hot path of every call: one pass over the leaves, and a batch of
        NumPy leaves or of leaves already on the mesh is returned as it is (the
        step's `in_shardings` place NumPy leaves within the call itself).
        """
        if self._one_process:
            n, lead, sharding = len(self.lead), self.lead, self.batch_sharding
            leaves = jax.tree_util.tree_leaves(batch)
            for x in leaves:
                if type(x) is np.ndarray:
                    if x.shape[:n] != lead:
                        break
                elif not (
                    isinstance(x, jax.Array)
                    and x.shape[:n] == lead
                    and x.sharding == sharding
                ):
                    break
            else:
                if leaves:
                    return batch
        self.check_batch(batch)
        return self.batch(batch)

    def check_batch(self, batch: Any) -> None:
        """Raise a clear error unless every leaf of `batch` (any PyTree of arrays)
        is an array with the leading axes this step expects."""
        # The hot path of every call: leaves only; paths only to name a fault.
        n = len(self.lead)
        leaves = jax.tree_util.tree_leaves(batch)
        if leaves and all(
            isinstance(x, (np.ndarray, jax.Array)) and x.shape[:n] == self.lead
            for x in leaves
        ):
            return
        leaves = jax.tree_util.tree_leaves_with_path(batch)
        if not leaves:
            raise ValueError(
                f"`batch` holds no array ({batch!r:.60}); pass a PyTree of arrays, "
                "e.g. `eqx_steps.shard({'image': x, 'label': y})`."
            )
        for path, x in leaves:
            name = f"batch{jax.tree_util.keystr(path)}"
            if not isinstance(x, (np.ndarray, jax.Array)):
                raise TypeError(
                    f"`{name}` is a {type(x).__name__} ({x!r:.60}), not an array; "
                    "every leaf of a batch must be a NumPy or JAX array (keep other "
                    "values out of the batch, e.g. as static fields of the model)."
                )
            shape = x.shape
            if tuple(shape[: len(self.lead)]) != self.lead:
                k = self.lead[0] if self.device_axis else 1
                layout = "(n_devices, per_device, ...)"
                fix = "reshape a local batch with `eqx_steps.shard(batch)`."
                if self.device_axis:
                    layout = f"(steps_per_call={k}, n_devices, per_device, ...)"
                    fix = fix[:-1] + f" and stack {k} of them on a new leading axis."
                raise ValueError(
                    f"`{name}` has shape {shape}, expected leading axes "
                    f"{self.lead} = {layout} for the {self.lead[-1]} devices of this "
                    f"process in the step's mesh; {fix}"
                )

    def batch(self, batch: Any) -> Any:
        """The batch on the mesh's devices (arrays already there are kept).

        Host (NumPy) leaves, JAX leaves not committed to a device (what JAX
        operations make by default) and JAX leaves laid out as the step wants but
        spelt otherwise (`jnp.stack` of placed batches gives `P()` on one device)
        go in one compiled call; only a batch holding arrays committed elsewhere
        goes through `jax.device_put`.
        """
        sharding = self.batch_sharding
        if self._one_process:
            leaves = jax.tree_util.tree_leaves(batch)
            placed = [
                isinstance(x, jax.Array) and x.sharding == sharding for x in leaves
            ]
            if all(placed):
                return batch
            elsewhere = any(  # a layout merely spelt otherwise is not elsewhere
                isinstance(x, jax.Array)
                and x.committed
                and not ok
                and not x.sharding.is_equivalent_to(sharding, x.ndim)
                for x, ok in zip(leaves, placed)
            )
            if not elsewhere:
                return host_placer(sharding)(batch)
            return jax.device_put(batch, sharding)
        n = self.mesh.devices.size

        def assemble(x):
            shape = list(np.shape(x))
            shape[self.device_axis] = n
            return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

        return jax.tree_util.tree_map(assemble, batch)

    def state(self, leaves: list[Any], *, copy: bool) -> list[jax.Array]:
        """The state's arrays replicated on every device of the mesh.

        With `copy`, every array is copied even if already in place, so that a
        donating step only ever consumes buffers this library made (never, say,
        the arrays of the model the user built the state from).
        """
        sharding = self.state_sharding
        if not self._one_process:
            return [
                jax.make_array_from_process_local_data(sharding, np.asarray(x))
                for x in leaves
            ]
        if copy:
            # device_put(may_alias=False) still shares the first device's buffer
            # (jax 0.10.2); a compiled copy does not. One program for the whole
            # state (a copy per leaf compiled one program per leaf shape).
            return _copy_on(sharding)(jax.device_put(list(leaves), sharding))
        # Without donation the buffers may be shared: one transfer call for the
        # leaves not yet in place, and no compiled program.
        todo = [
            i
            for i, x in enumerate(leaves)
            if not (isinstance(x, jax.Array) and x.sharding == sharding)
        ]
        out = list(leaves)
        for i, x in zip(todo, jax.device_put([out[i] for i in todo], sharding)):
            out[i] = x
        return out

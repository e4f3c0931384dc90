"""The backends: how a per-device function is mapped over the devices.

Each strategy turns `body(arrays, batch) -> out`, a function of one device's
state arrays and batch that may use collectives over the axis `"device"`, into a
function of the replicated arrays and the whole batch (device axis at
`device_axis`), returning `out` once (it is the same on every device). The
caller compiles that with `jax.jit`. Everything else (the state split, the
compile cache, placement, `steps_per_call`, the non-finite policy) is shared and
lives in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..state import DEVICE_AXIS
from ._mesh import check_devices, device_mesh


Body = Callable[[list[Any], Any], Any]


class Strategy:
    """What every backend has: the state's arrays placed as they are."""

    def place_state(self, arrays: list[Any], static: Any) -> list[Any]:
        """The state's `arrays`, already on the mesh, laid out for this backend."""
        del static
        return arrays


class PmapStrategy(Strategy):
    """`backend="pmap"`: `jax.pmap` over this process's devices.

    The arrays are broadcast (`in_axes=None`), the batch is mapped along its
    device axis, the result comes back once (`out_axes=None`). The mapped function
    is traced inside the caller's `jax.jit`, which donates the state's arrays
    only (`pmap`'s own donation would donate the batch too) and dispatches
    each call from C++. One process only.
    """

    name = "pmap"

    def __init__(self, devices: Sequence[Any] | None = None):
        if jax.process_count() > 1:
            raise ValueError(
                "`backend` = 'pmap' cannot run across processes (this is a "
                f"{jax.process_count()}-process job); use backend='sharded'."
            )
        if devices is None:
            devices = jax.local_devices()
        self.devices = check_devices("devices", devices, local=True)
        self.mesh = device_mesh(self.devices)

    def map(self, body: Body, device_axis: int, static: Any = None) -> Body:
        # `jax.pmap` itself: the body takes arrays only (the state's static part
        # is closed over), so `eqx.filter_pmap`'s partitioning has nothing to do,
        # and its extra trace of the body (for the output structure) doubled the
        # step's tracing time (docs/performance.md).
        mapped = jax.pmap(
            body,
            in_axes=(None, device_axis),
            out_axes=None,
            axis_name=DEVICE_AXIS,
            devices=self.devices,
        )

        def on_devices(arrays, batch):  # jax.jit takes functions, not Modules
            return mapped(arrays, batch)

        return on_devices


class ShardedStrategy(Strategy):
    """`backend="sharded"`: `jax.shard_map` over a mesh of every process's devices.

    The arrays are replicated (`P()`), the batch is split along its device axis
    (`P("device")`), the result is replicated. `check_vma=False` with the
    explicit `pmean`s of the steps: with the default check, gradients of
    replicated parameters would come back summed.
    """

    name = "sharded"

    def __init__(self, devices: Sequence[Any] | None = None):
        if devices is None:
            devices = jax.devices()
        self.devices = check_devices("devices", devices)
        self.mesh = device_mesh(self.devices)

    def map(self, body: Body, device_axis: int, static: Any = None) -> Body:
        def drop_device_axis(arrays, batch):  # of size 1 on each device
            batch = jax.tree_util.tree_map(lambda x: jnp.squeeze(x, device_axis), batch)
            return body(arrays, batch)

        return jax.shard_map(
            drop_device_axis,
            mesh=self.mesh,
            in_specs=(P(), P(*([None] * device_axis), DEVICE_AXIS)),
            out_specs=P(),
            check_vma=False,
        )


STRATEGIES = {"pmap": PmapStrategy, "sharded": ShardedStrategy}

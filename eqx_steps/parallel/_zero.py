"""Sharded optimizer state (ZeRO stage 1) for `backend="sharded"`.

Every device keeps the whole model, but only 1/N of the optimizer state: each
parameter leaf is cut along one axis (its largest axis whose length divides by
the device count N), the gradients are reduce-scattered (each device receives
the mean over the devices of its slice only), the optimizer updates each
device's slice of the parameters with that slice of the gradients and of the
moments, and the update slices are all-gathered so that every device applies
the same whole update to its whole model. A leaf none of whose axes divides by N
stays whole on every device (small leaves: biases, odd widths).

The state the user sees stays an ordinary `TrainState`: its `opt_state` leaves
are global arrays of their usual shapes, laid out over the devices with a
`NamedSharding` (`P(..., "device", ...)` on the cut axis), so checkpoints store
and restore them as any other array, into either layout.

Only optimizers whose update is elementwise can run on slices: an update that
reduces over a leaf (`optax.clip_by_global_norm`, LAMB's trust ratio, ...)
would silently compute the norm of one slice. [`check_elementwise`][] refuses
those when the step is compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend.core import subjaxprs
from jax.sharding import NamedSharding, PartitionSpec as P

from ..state import DEVICE_AXIS, TrainState
from ..steps import Batch, Metrics
from ._flat import Static
from ._strategies import Body, ShardedStrategy


# Primitives that act on each element on its own (with scalars broadcast).
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp
    convert_element_type copy copy_p cos cosh div eq erf erf_inv exp exp2 expm1
    floor ge gt integer_pow is_finite le lgamma digamma log log1p logistic lt max
    min mul ne neg nextafter not or pow reduce_precision rem round rsqrt select_n
    sign sin sinh sqrt square stop_gradient sub tan tanh xor""".split()
)
# Primitives that only hold other jaxprs (checked in turn).
_CONTAINERS = frozenset(
    """jit pjit closed_call core_call custom_jvp_call custom_vjp_call
    custom_vjp_call_jaxpr remat checkpoint cond while""".split()
)


def cut_axis(shape: Sequence[int], n: int) -> int | None:
    """The axis a leaf of `shape` is cut along over `n` devices: its largest axis
    whose length divides by `n` (the first of equal ones); `None` (kept whole)
    for `n == 1` or when no axis divides."""
    if n == 1:
        return None
    fits = [(-d, i) for i, d in enumerate(shape) if d >= n and d % n == 0]
    return min(fits)[1] if fits else None


def _spec(axis: int | None) -> P:
    return P() if axis is None else P(*([None] * axis), DEVICE_AXIS)


def _local(x: jax.ShapeDtypeStruct, axis: int | None, n: int) -> jax.ShapeDtypeStruct:
    if axis is None:
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    shape = list(x.shape)
    shape[axis] //= n
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)


def _non_elementwise(jaxpr: Any) -> str | None:
    """The first primitive of `jaxpr` that mixes the elements of an array."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        arrays = any(getattr(v.aval, "shape", ()) != () for v in eqn.invars)
        if arrays and name not in _ELEMENTWISE and name not in _CONTAINERS:
            return name
    for sub in subjaxprs(jaxpr):
        found = _non_elementwise(sub)
        if found:
            return found
    return None


def check_elementwise(tx: optax.GradientTransformation, params: Any, opt: Any) -> None:
    """Raise `ValueError` unless `tx.update` treats each element on its own."""
    shapes = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t
    )
    grads = shapes(params)
    jaxpr = jax.make_jaxpr(tx.update)(grads, shapes(opt), grads)
    found = _non_elementwise(jaxpr.jaxpr)
    if found:
        raise ValueError(
            "`shard_optimizer_state` = True needs an optimizer whose update treats "
            f"each parameter element on its own, but this one uses `{found}` over "
            "whole arrays (e.g. `optax.clip_by_global_norm`, LAMB/LARS trust "
            "ratios), which on a slice of the parameters would silently give "
            "another result; pass shard_optimizer_state=False for this optimizer."
        )


def _cut_axes(params: Any, n: int) -> Any:
    # -1 for a leaf kept whole (a `None` would be taken for an absent leaf).
    def axis(p):
        a = cut_axis(p.shape, n)
        return -1 if a is None else a

    return jax.tree_util.tree_map(axis, params)


def _axis(a: int) -> int | None:
    return None if a < 0 else a


def opt_specs(state: TrainState, n: int) -> list[P]:
    """The `PartitionSpec` of each leaf of `state.opt_state` over `n` devices,
    found by initialising the optimizer on the slices of the parameters."""
    params = state.params
    axes = _cut_axes(params, n)
    local = jax.tree_util.tree_map(lambda p, a: _local(p, _axis(a), n), params, axes)
    local_opt = jax.eval_shape(state.tx.init, local)
    glob, treedef = jax.tree_util.tree_flatten(state.opt_state)
    loc, local_treedef = jax.tree_util.tree_flatten(local_opt)
    if treedef != local_treedef:
        raise ValueError(
            "`shard_optimizer_state` = True: this optimizer's state has another "
            "structure for a slice of the parameters than for the whole; pass "
            "shard_optimizer_state=False for this optimizer."
        )
    check_elementwise(state.tx, params, state.opt_state)
    return [_leaf_spec(g.shape, lo.shape, n) for g, lo in zip(glob, loc)]


def _leaf_spec(shape: tuple, local: tuple, n: int) -> P:
    if shape == local:
        return P()
    cut = [i for i, (g, lo) in enumerate(zip(shape, local)) if g != lo]
    if len(shape) != len(local) or len(cut) != 1 or shape[cut[0]] != n * local[cut[0]]:
        raise ValueError(
            f"`shard_optimizer_state` = True: an optimizer state leaf of shape "
            f"{shape} has shape {local} for a slice of the parameters, which is not "
            "one slice of it; this optimizer's state is not elementwise: pass "
            "shard_optimizer_state=False."
        )
    return _spec(cut[0])


def state_specs(static: Static, arrays: Sequence[Any], n: int) -> list[P]:
    """The `PartitionSpec` of each of the state's arrays: the optimizer state's
    leaves cut over the devices, every other array whole on each."""
    specs: list[list[P]] = []

    def find(arrays):
        state = static.build(arrays)  # fresh tracers: one identity per position
        where = {
            id(x): s
            for x, s in zip(
                jax.tree_util.tree_leaves(state.opt_state), opt_specs(state, n)
            )
        }
        specs.append([where.get(id(x), P()) for x in arrays])

    abstract = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in arrays]
    jax.eval_shape(find, abstract)
    return specs[0]


def _slice(x: jax.Array, a: int, n: int) -> jax.Array:
    if a < 0:
        return x
    size = x.shape[a] // n
    start = jax.lax.axis_index(DEVICE_AXIS) * size
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=a)


def _reduce(g: jax.Array, a: int, n: int) -> jax.Array:
    """This device's slice of the mean over the devices of `g` (a reduce-scatter
    along axis `a`), or the whole mean for a leaf kept whole."""
    if a < 0:
        return jax.lax.pmean(g, DEVICE_AXIS)
    summed = jax.lax.psum_scatter(g, DEVICE_AXIS, scatter_dimension=a, tiled=True)
    return summed / n


def _gather(u: jax.Array, a: int) -> jax.Array:
    return u if a < 0 else jax.lax.all_gather(u, DEVICE_AXIS, axis=a, tiled=True)


class _Reducing(optax.GradientTransformation):
    """An optax `GradientTransformation` whose `update` takes each device's own,
    unaveraged gradients and averages them over the devices itself.

    [`eqx_steps.train_step`][] reads `reduces_gradients` and then leaves its own
    average of the gradients out.
    """

    __slots__ = ()
    reduces_gradients = True


def sliced_tx(tx: optax.GradientTransformation, n: int) -> optax.GradientTransformation:
    """`tx` run inside `shard_map` on this device's slice of each leaf: takes each
    device's own gradients (averaging them anyway is harmless), the whole
    parameters and this device's slice of the optimizer state; returns the whole
    update (slices all-gathered) and the new slice.

    The gradients are reduce-scattered: each device receives only the mean of
    its slice of every cut leaf, and the whole mean of a leaf kept whole. With
    `n == 1` nothing is cut or reduced: `tx` itself.
    """
    if n == 1:
        return tx

    def update(grads, opt_state, params=None):
        axes = _cut_axes(grads, n)
        on = lambda f, t: jax.tree_util.tree_map(lambda x, a: f(x, a, n), t, axes)  # noqa: E731
        local_params = None if params is None else on(_slice, params)
        updates, opt_state = tx.update(on(_reduce, grads), opt_state, local_params)
        return jax.tree_util.tree_map(_gather, updates, axes), opt_state

    return _Reducing(tx.init, update)  # pyright: ignore


Step = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def shard_update(per_device: Step, n: int) -> Step:
    """The per-device training step with its optimizer run on slices."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        new, metrics = per_device(state.replace(tx=sliced_tx(state.tx, n)), batch)
        return new.replace(tx=state.tx), metrics

    return step


class ZeroStrategy(ShardedStrategy):
    """`backend="sharded"` with the optimizer state cut over the devices.

    As [`ShardedStrategy`][], except that the state's arrays are laid out by
    [`state_specs`][] (the optimizer state's leaves cut, the rest whole) on the
    way in and out of `shard_map`, and that placing a state lays its optimizer
    state out so.
    """

    def map(self, body: Body, device_axis: int, static: Static | None = None) -> Body:
        assert static is not None, "ZeroStrategy.map needs the state's static part"
        n = len(self.devices)
        batch_spec = P(*([None] * device_axis), DEVICE_AXIS)

        def drop_device_axis(arrays, batch):
            batch = jax.tree_util.tree_map(lambda x: jnp.squeeze(x, device_axis), batch)
            return body(arrays, batch)

        def on_devices(arrays, batch):
            specs = state_specs(static, arrays, n)
            return jax.shard_map(
                drop_device_axis,
                mesh=self.mesh,
                in_specs=(specs, batch_spec),
                out_specs=(specs, P()),
                check_vma=False,
            )(arrays, batch)

        return on_devices

    def place_state(self, arrays: list[Any], static: Static) -> list[Any]:
        """`arrays` (on the mesh) with the optimizer state's leaves cut over it."""
        specs = state_specs(static, arrays, len(self.devices))
        return [
            x if s == P() else jax.device_put(x, NamedSharding(self.mesh, s))
            for x, s in zip(arrays, specs)
        ]

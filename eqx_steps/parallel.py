"""Data-parallel execution of the per-device steps on every device.

`parallel_train_step` and `parallel_eval_step` take and return an ordinary,
unreplicated-looking `TrainState`: its arrays are global arrays replicated on every
device, so nothing is copied between calls and the user never calls
`replicate`/`unreplicate`. Batches carry a leading device axis
(`(n_devices, per_device, ...)`, see `shard`).

Both backends run the same per-device function with the collective axis
`"device"`:

- `"pmap"`: `jax.pmap` over the local devices (what `eqx.filter_pmap` does, with
  the static parts of the state kept out of the per-call work);
- `"sharded"`: `jax.shard_map` under `jax.jit` over a `Mesh` of all global
  devices; works across processes.

The call path flattens the state once per call, looks the compiled function up by
the state's structure and static leaves, and calls it on the flat list of arrays.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any, cast, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import subjaxprs
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, PyTree

from .state import DEVICE_AXIS, TrainState
from .steps import (
    Batch,
    check_batch,
    Criterion,
    eval_step,
    Metrics,
    MetricsFn,
    PostFn,
    train_step,
    train_step_post,
)


Backend = Literal["pmap", "sharded"]
NanPolicy = Literal["raise", "skip", "ignore"]
_BACKENDS = ("pmap", "sharded")
_NAN_POLICIES = ("raise", "skip", "ignore")

# XLA:CPU's in-process collectives deadlock when several dozen multi-device
# executions are queued at once (seen with 4 host devices on 2 cores: fine at 32,
# stuck at 64). Keeping at most this many calls in flight costs nothing measurable
# and keeps the queue far from that.
_MAX_IN_FLIGHT = 8
_in_flight: collections.deque = collections.deque()


def _throttle(out: Any) -> None:
    _in_flight.append(out)
    while len(_in_flight) > _MAX_IN_FLIGHT:
        jax.block_until_ready(_in_flight.popleft())


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


# ---------------------------------------------------------------------------
# SCICO-style helpers for users' own pmaps.


def _device_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DEVICE_AXIS,))


def replicate(tree: PyTree, devices: Sequence[Any] | None = None) -> PyTree:
    """Give every array leaf a leading device axis, one copy per device.

    For users' own `eqx.filter_pmap`/`jax.pmap` loops, as SCICO's `replicate`;
    the parallel steps of this library do not need it. Non-array leaves are left
    as they are.

    **Arguments:**

    - `tree`: any PyTree, e.g. a `TrainState`.
    - `devices`: the devices to replicate onto (default: all local devices).

    **Returns:**

    The PyTree with each array leaf of shape `(n_devices, *shape)`, laid out one
    slice per device.
    """
    mesh = _device_mesh(devices)
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


def shard(batch: PyTree) -> PyTree:
    """Reshape a local batch `(local_batch, ...)` to `(n_devices, per_device, ...)`.

    **Arguments:**

    - `batch`: a PyTree of arrays with equal leading size, divisible by the number
        of local devices.

    **Returns:**

    The same PyTree with each leaf reshaped to `(n_devices, per_device, ...)`.
    """
    n = jax.local_device_count()

    def split(x):
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(
                f"`batch` has a leaf of shape {x.shape} whose leading size is not "
                f"divisible by the {n} local devices; use a batch size that is a "
                f"multiple of {n} (e.g. {max(n, (x.shape[0] // n or 1) * n)})."
            )
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


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


# ---------------------------------------------------------------------------
# The parallel call path.


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(
            f"`{name}` = {value!r} is not valid; use one of "
            f"{', '.join(map(repr, choices))}."
        )


class _Flat(NamedTuple):
    """How to rebuild a PyTree from its dynamic (array) leaves."""

    treedef: Any
    static: tuple  # the non-array leaves, `_DYN` where an array goes

    def build(self, dynamic: Sequence[Any]) -> Any:
        it = iter(dynamic)
        leaves = [next(it) if s is _DYN else s for s in self.static]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


class _Dyn:
    def __repr__(self):
        return "<array>"


_DYN = _Dyn()


def _split(tree: Any) -> tuple[list[Any], _Flat]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic, static = [], []
    for x in leaves:  # one pass: _is_dynamic once per leaf
        if _is_dynamic(x):
            dynamic.append(x)
            static.append(_DYN)
        else:
            static.append(x)
    return dynamic, _Flat(treedef, tuple(static))


def _cache_key(flat: _Flat) -> Any:
    try:
        hash(flat.static)
        return (flat.treedef, flat.static)
    except TypeError:
        return (flat.treedef, tuple(map(id, flat.static)))


class _ParallelFn:
    """A per-device function `(state, batch) -> (state?, metrics)` on every device."""

    def __init__(
        self,
        per_device: Callable[[TrainState, Batch], Any],
        *,
        returns_state: bool,
        backend: Backend,
        donate: bool,
        steps_per_call: int,
        nan_policy: NanPolicy,
        unroll: int | bool | Literal["auto"],
        compiler_options: dict[str, Any] | None = None,
    ):
        _check_choice("backend", backend, _BACKENDS)
        _check_choice("nan_policy", nan_policy, _NAN_POLICIES)
        if not isinstance(steps_per_call, int) or steps_per_call < 1:
            raise ValueError(
                f"`steps_per_call` = {steps_per_call!r} must be a positive int "
                "(1 = one step per call)."
            )
        if not (
            unroll == "auto"
            or isinstance(unroll, bool)
            or (isinstance(unroll, int) and unroll >= 1)
        ):
            raise ValueError(
                f"`unroll` = {unroll!r} must be 'auto', True (unroll fully), False "
                "or a positive int (steps per loop iteration)."
            )
        if compiler_options is not None and backend != "sharded":
            raise ValueError(
                f"`compiler_options` = {compiler_options!r} needs backend='sharded' "
                f"(got backend={backend!r}: jax.pmap takes no compiler options)."
            )
        if backend == "pmap" and jax.process_count() > 1:
            raise ValueError(
                "`backend` = 'pmap' cannot run across processes (this is a "
                f"{jax.process_count()}-process job); use backend='sharded'."
            )
        self.per_device = per_device
        self.returns_state = returns_state
        self.backend = backend
        self.donate = donate
        self.steps_per_call = steps_per_call
        self.nan_policy = nan_policy
        self.unroll = unroll
        self.compiler_options = compiler_options
        if backend == "pmap":
            self.devices = jax.local_devices()
        else:
            self.devices = jax.devices()
        self.mesh = Mesh(np.asarray(self.devices), (DEVICE_AXIS,))
        self.n_devices = len(self.devices)
        self.n_local = jax.local_device_count()
        batch_spec = P(DEVICE_AXIS) if steps_per_call == 1 else P(None, DEVICE_AXIS)
        self.batch_sharding = NamedSharding(self.mesh, batch_spec)
        self.state_sharding = NamedSharding(self.mesh, P())
        self._cache: dict[Any, Callable] = {}
        self._last_state: TrainState | None = None
        self._last: tuple[list[Any], _Flat, Callable] | None = None

    # -- the per-device body -------------------------------------------------

    def _body(self, flat: _Flat, dynamic: list[Any], batch: Batch):
        if not self.returns_state:
            return None, self.per_device(flat.build(dynamic), batch)

        def one(state, batch):
            new_state, metrics = self.per_device(state, batch)
            metrics = dict(metrics)
            if self.nan_policy != "ignore":
                finite = _all_finite((metrics.get("loss"), new_state.model))
                kept = state.replace(step=new_state.step)
                new_state = jax.tree_util.tree_map(
                    lambda new, old: (
                        new
                        if new is old or not eqx.is_array(new)
                        else jnp.where(finite, new, old)
                    ),
                    new_state,
                    kept,
                )
                metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
            return new_state, metrics

        def one_flat(dynamic, batch):
            new_state, metrics = one(flat.build(dynamic), batch)
            new_dynamic, new_flat = _split(new_state)
            if _cache_key(new_flat) != _cache_key(flat):
                raise ValueError(
                    "the training step returned a state of another structure than it "
                    "was given (a post-processor or a custom step changed the model's "
                    "structure or a static field); return a state of the same "
                    "structure."
                )
            return new_dynamic, metrics

        if self.steps_per_call == 1:
            return one_flat(dynamic, batch)
        unroll = self.unroll
        if isinstance(unroll, str):  # "auto"
            unroll = self._auto_unroll(one_flat, dynamic, batch)
        return jax.lax.scan(one_flat, dynamic, batch, unroll=unroll)

    def _auto_unroll(
        self, one_flat: Callable, dynamic: list[Any], batch: Batch
    ) -> int | bool:
        # XLA:CPU runs a rolled loop over convolutions some 30x slower than the
        # unrolled one, while for dense steps the rolled loop is as fast or
        # faster and compiles several times quicker (docs/performance.md).
        if self.devices[0].platform != "cpu":
            return 1
        # The avals as they are (weak types included), the batch of one step.
        avals = jax.tree_util.tree_map(jax.typeof, (dynamic, batch))
        one_batch = jax.tree_util.tree_map(
            lambda a: a.update(shape=a.shape[1:]), avals[1]
        )
        jaxpr = jax.make_jaxpr(one_flat, axis_env=[(DEVICE_AXIS, self.n_devices)])(
            avals[0], one_batch
        )
        return True if _has_primitive(jaxpr.jaxpr, "conv_general_dilated") else 1

    def _compile(self, flat: _Flat) -> Callable:
        def body(dynamic, batch):
            return self._body(flat, dynamic, batch)

        donate = (0,) if self.donate and self.returns_state else ()
        if self.backend == "pmap":
            batch_axis = 0 if self.steps_per_call == 1 else 1
            return jax.pmap(
                body,
                axis_name=DEVICE_AXIS,
                in_axes=(None, batch_axis),
                out_axes=(None, None),
                devices=self.devices,
                donate_argnums=donate,
            )
        batch_spec = self.batch_sharding.spec
        # The device axis is consumed by shard_map; drop it per device.
        axis = 0 if self.steps_per_call == 1 else 1

        def per_device(dynamic, batch):
            batch = jax.tree_util.tree_map(lambda x: jnp.squeeze(x, axis), batch)
            return body(dynamic, batch)

        mapped = jax.shard_map(
            per_device,
            mesh=self.mesh,
            in_specs=(P(), batch_spec),
            out_specs=(P(), P()),
            check_vma=False,
        )
        return jax.jit(
            mapped, donate_argnums=donate, compiler_options=self.compiler_options
        )

    # -- the call --------------------------------------------------------------

    def _check_batch(self, batch: Batch) -> None:
        check_batch(batch)
        k = self.steps_per_call
        want = (self.n_local,) if k == 1 else (k, self.n_local)
        for name, x in batch.items():
            shape = getattr(x, "shape", None)
            if shape is None or tuple(shape[: len(want)]) != want:
                lead = "(n_devices, per_device, ...)"
                if k > 1:
                    lead = f"(steps_per_call={k}, n_devices, per_device, ...)"
                raise ValueError(
                    f"`batch[{name!r}]` has shape {shape}, expected leading axes "
                    f"{want} = {lead} for {self.n_local} local devices; reshape a "
                    "local batch with `eqx_steps.shard(batch)`"
                    + (
                        " and stack steps_per_call of them on a new leading axis."
                        if k > 1
                        else "."
                    )
                )

    def _place_batch(self, batch: Batch) -> Batch:
        if self.backend == "pmap":
            return batch
        sharding = self.batch_sharding
        if jax.process_count() == 1:
            return {
                k: x
                if isinstance(x, jax.Array) and x.sharding == sharding
                else jax.device_put(x, sharding)
                for k, x in batch.items()
            }
        axis = 0 if self.steps_per_call == 1 else 1
        out = {}
        for k, x in batch.items():
            shape = list(np.shape(x))
            shape[axis] = self.n_devices
            out[k] = jax.make_array_from_process_local_data(sharding, x, tuple(shape))
        return out

    def _place_state(self, dynamic: list[Any]) -> list[Any]:
        # A state this function did not just return is copied onto every device
        # first, so that donation only ever consumes buffers this library made
        # (never, say, the arrays of the model the user built the state from).
        sharding = self.state_sharding
        if jax.process_count() == 1:
            # device_put(may_alias=False) still shares the first device's buffer
            # (jax 0.10.2); an explicit copy does not.
            place = lambda x: jax.device_put(jnp.array(x, copy=True), sharding)  # noqa: E731
        else:
            place = lambda x: jax.make_array_from_process_local_data(  # noqa: E731
                sharding, np.asarray(x)
            )
        return [
            x
            if isinstance(x, jax.Array) and x.sharding == sharding and not self.donate
            else place(x)
            for x in dynamic
        ]

    def __call__(self, state: TrainState, batch: Batch):
        if not isinstance(state, TrainState):
            raise TypeError(
                f"`state` must be an eqx_steps.TrainState, got {type(state).__name__};"
                " build one with `TrainState.create(model, tx)`."
            )
        self._check_batch(batch)
        if self._last is not None and state is self._last_state:
            # The state this function returned last time (the usual training
            # loop), or evaluated last time (an evaluation loop): its leaves are
            # in place and its structure is known, so the flatten, the cache
            # lookup and the placement checks are skipped.
            dynamic, flat, fn = self._last
        else:
            dynamic, flat = _split(state)
            key = _cache_key(flat)
            fn = self._cache.get(key)
            if fn is None:
                fn = self._cache[key] = self._compile(flat)
            dynamic = self._place_state(dynamic)
        new_dynamic, metrics = fn(dynamic, self._place_batch(batch))
        _throttle(metrics)
        if not self.returns_state:
            # An evaluation loop passes the same state batch after batch.
            self._last_state, self._last = state, (dynamic, flat, fn)
            return metrics
        new_state = flat.build(new_dynamic)
        self._last_state, self._last = new_state, (new_dynamic, flat, fn)
        if self.nan_policy == "raise":
            self._raise_if_nonfinite(new_state, metrics)
        return new_state, metrics

    def _raise_if_nonfinite(self, new_state: TrainState, metrics: Metrics) -> None:
        bad = np.atleast_1d(np.asarray(metrics["nonfinite"]))
        if bad.any():
            i = int(np.argmax(bad))
            first = int(np.asarray(new_state.step)) - len(bad) + i
            loss = np.atleast_1d(np.asarray(metrics.get("loss", np.nan)))[i]
            error = FloatingPointError(
                f"non-finite loss or parameters at step {first} (loss = {loss}); the "
                "update was not applied and the state is in this error's `state` "
                "attribute. Lower the learning rate, check the data, or pass "
                "nan_policy='skip' to drop such updates and continue."
            )
            error.state = new_state  # pyright: ignore[reportAttributeAccessIssue]
            raise error


def _has_primitive(jaxpr: Any, name: str) -> bool:
    """Whether `jaxpr` or a jaxpr nested in its equations uses primitive `name`."""
    return any(eqn.primitive.name == name for eqn in jaxpr.eqns) or any(
        _has_primitive(sub, name) for sub in subjaxprs(jaxpr)
    )


def _all_finite(tree: PyTree) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if eqx.is_inexact_array(x)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def parallel_train_step(
    learning_rate_fn: optax.Schedule | None,
    criterion: Criterion,
    metrics_fn: MetricsFn,
    *,
    post_lst: Sequence[PostFn] | None = None,
    train_step_fn: Callable[..., tuple[TrainState, Metrics]] = train_step,
    backend: Backend = "pmap",
    donate: bool = True,
    steps_per_call: int = 1,
    nan_policy: NanPolicy = "raise",
    unroll: int | bool | Literal["auto"] = "auto",
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build a data-parallel training step over every device.

    The returned callable takes an ordinary `TrainState` and a batch with a
    leading device axis, runs `train_step_fn` (then `post_lst`, as
    [`eqx_steps.train_step_post`][]) on every device with the collective axis
    `"device"`, and returns the new state (the same on every device) and the
    metrics averaged over devices.

    **Arguments:**

    - `learning_rate_fn`, `criterion`, `metrics_fn`: as for
        [`eqx_steps.train_step`][].
    - `post_lst`: post-processors applied after each update, or `None`.
    - `train_step_fn`: the per-device step (default [`eqx_steps.train_step`][]).
    - `backend`: `"pmap"` (one process) or `"sharded"` (`shard_map` under `jit`;
        less dispatch overhead; works across processes).
    - `donate`: donate the state's buffers to the step (never the batch's); the
        state passed in must not be used afterwards.
    - `steps_per_call`: run this many steps per call; the batch then carries them
        on a new leading axis, `(steps_per_call, n_devices, per_device, ...)`, and
        the metrics have a leading axis of that length.
    - `nan_policy`: what a non-finite loss or update does: `"raise"` (default)
        raises `FloatingPointError` naming the step, with the update not applied
        (the error's `state` attribute holds the state to continue from; this
        policy reads one flag back to the host after every call);
        `"skip"` drops the update and continues (the step counter still advances,
        `metrics["nonfinite"]` is 1); `"ignore"` applies it.
    - `unroll`: the unroll of the `lax.scan` over `steps_per_call` steps, as for
        `jax.lax.scan`. `"auto"` (default) unrolls fully on CPU when the step has
        a convolution (XLA:CPU runs a rolled loop over convolutions some 30x
        slower) and keeps the loop rolled otherwise (as fast or faster for dense
        models, and much quicker to compile).
    - `compiler_options`: XLA options for compiling this step only (backend
        `"sharded"`), as for `jax.jit`; e.g. `{"xla_disable_hlo_passes":
        "cpu-all-reduce-combiner"}` reduces the gradients one leaf at a time, which
        lowers the peak memory of a donated step on several CPU devices (see
        docs/performance.md).

    **Returns:**

    A function `(state, batch) -> (state, metrics)`.
    """
    if post_lst:
        post = tuple(post_lst)

        def per_device(state, batch):
            return train_step_post(
                state,
                batch,
                learning_rate_fn,
                criterion,
                train_step_fn,
                metrics_fn,
                post,
                axis_name=DEVICE_AXIS,
            )

    else:

        def per_device(state, batch):
            return train_step_fn(
                state,
                batch,
                learning_rate_fn,
                criterion,
                metrics_fn,
                axis_name=DEVICE_AXIS,
            )

    return _ParallelFn(
        per_device,
        returns_state=True,
        backend=backend,
        donate=donate,
        steps_per_call=steps_per_call,
        nan_policy=nan_policy,
        unroll=unroll,
        compiler_options=compiler_options,
    )


def parallel_eval_step(
    criterion: Criterion,
    metrics_fn: MetricsFn,
    *,
    eval_step_fn: Callable[..., Metrics] = eval_step,
    backend: Backend = "pmap",
) -> Callable[[TrainState, Batch], Metrics]:
    """Build a data-parallel evaluation step over every device.

    **Arguments:**

    - `criterion`, `metrics_fn`: as for [`eqx_steps.eval_step`][].
    - `eval_step_fn`: the per-device step (default [`eqx_steps.eval_step`][]).
    - `backend`: `"pmap"` or `"sharded"`, as for
        [`eqx_steps.parallel_train_step`][].

    **Returns:**

    A function `(state, batch) -> metrics`, metrics averaged over devices; the
    state is neither changed nor donated.
    """

    def per_device(state, batch):
        return eval_step_fn(state, batch, criterion, metrics_fn, axis_name=DEVICE_AXIS)

    fn = _ParallelFn(
        per_device,
        returns_state=False,
        backend=backend,
        donate=False,
        steps_per_call=1,
        nan_policy="ignore",
        unroll=1,
    )
    return cast(Callable[[TrainState, Batch], Metrics], fn)

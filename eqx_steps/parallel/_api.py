"""The builders of the parallel steps: `parallel_train_step`, `parallel_eval_step`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import optax

from .._step_checks import check_callables, check_post_lst
from .._validate import check_bool, check_choice, check_int
from ..schedules import as_schedule
from ..state import DEVICE_AXIS, TrainState
from ..steps import (
    Batch,
    Criterion,
    eval_step,
    Metrics,
    MetricsFn,
    PostFn,
    train_step,
    train_step_post,
)
from ._nonfinite import NanPolicy, NonFinitePolicy
from ._scan import check_unroll, Unroll
from ._step import ParallelStep
from ._strategies import STRATEGIES
from ._zero import shard_update, ZeroStrategy


Backend = Literal["pmap", "sharded"]


def _check_compiler_options(options: Any) -> dict[str, Any] | None:
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise TypeError(
            f"`compiler_options` must be a dict of XLA options or None, got "
            f"{options!r}; pass e.g. "
            "{'xla_disable_hlo_passes': 'cpu-all-reduce-combiner'}."
        )
    options = dict(options)
    try:  # XLA knows its options; ask it now, not at the first step
        jax.jit(lambda: 0, compiler_options=options).lower().compile()
    except Exception as e:  # noqa: BLE001 - XLA's error type is private
        raise ValueError(
            f"`compiler_options` = {options!r} is refused by XLA ({e}); pass option "
            "names and values that XLA knows, e.g. "
            "{'xla_disable_hlo_passes': 'cpu-all-reduce-combiner'}."
        ) from None
    return options


def _build(
    per_device: Callable,
    *,
    returns_state: bool,
    backend: Any,
    devices: Any,
    donate: Any,
    steps_per_call: Any,
    unroll: Any,
    nan_policy: Any,
    compiler_options: Any,
    shard_optimizer_state: Any = False,
    view: Callable[[TrainState], TrainState] | None = None,
) -> ParallelStep:
    """The step, with every option checked at this public boundary."""
    check_choice("backend", backend, tuple(STRATEGIES))
    strategy = STRATEGIES[backend](devices)
    if check_bool("shard_optimizer_state", shard_optimizer_state):
        if backend != "sharded":
            raise ValueError(
                f"`shard_optimizer_state` = True needs backend='sharded', got "
                f"backend={backend!r}; pass backend='sharded' (or "
                "shard_optimizer_state=False)."
            )
        strategy = ZeroStrategy(strategy.devices)
        per_device = shard_update(per_device, len(strategy.devices))
    return ParallelStep(
        per_device,
        returns_state=returns_state,
        strategy=strategy,
        donate=check_bool("donate", donate),
        steps_per_call=check_int("steps_per_call", steps_per_call, minimum=1),
        unroll=check_unroll(unroll),
        policy=NonFinitePolicy(nan_policy),
        compiler_options=_check_compiler_options(compiler_options),
        view=view,
    )


def parallel_train_step(
    learning_rate_fn: optax.Schedule | None,
    criterion: Criterion,
    metrics_fn: MetricsFn,
    *,
    post_lst: Sequence[PostFn] | None = None,
    train_step_fn: Callable[..., tuple[TrainState, Metrics]] = train_step,
    backend: Backend = "pmap",
    donate: bool = False,
    steps_per_call: int = 1,
    nan_policy: NanPolicy = "raise",
    unroll: Unroll = "auto",
    compiler_options: dict[str, Any] | None = None,
    devices: Sequence[Any] | None = None,
    shard_optimizer_state: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Build a data-parallel training step over every device.

    The returned callable takes an ordinary `TrainState` (never a replicated one)
    and a batch with a leading device axis (see [`eqx_steps.shard`][]), runs
    `train_step_fn` (then `post_lst`, as [`eqx_steps.train_step_post`][]) on
    every device with the collective axis `"device"`, and returns the new state
    (the same on every device) and the metrics averaged over devices. It also has
    `.lower(state, batch)`, the program a call runs, and `.cache_size`, the
    number of programs compiled (one per state structure and static leaves).

    **Arguments:**

    - `learning_rate_fn`, `criterion`, `metrics_fn`: as for
        [`eqx_steps.train_step`][].
    - `post_lst`: post-processors applied after each update, or `None`.
    - `train_step_fn`: the per-device step (default [`eqx_steps.train_step`][]).
    - `backend`: `"pmap"` (`eqx.filter_pmap` over this process's devices) or
        `"sharded"` (`jax.shard_map` under `jax.jit` over every process's
        devices; works across processes).
    - `donate`: donate the state's buffers to the step (never the batch's), which
        saves memory; the state passed in is consumed (passing it again raises a
        `ValueError`). Default `False`, as in JAX and Equinox: earlier states stay
        usable.
    - `steps_per_call`: run this many steps per call; the batch then carries them
        on a new leading axis, `(steps_per_call, n_devices, per_device, ...)`, and
        the metrics have a leading axis of that length.
    - `nan_policy`: what a non-finite loss, parameter or model-state leaf does:
        `"raise"` (default) raises [`eqx_steps.NonFiniteStepError`][] (a
        `FloatingPointError`) naming the step, with the update not applied (its
        `state` attribute holds the state to continue from; this policy reads one
        flag back to the host after every call); `"skip"` drops the update and
        continues (the step counter still advances, `metrics["nonfinite"]` is 1);
        `"ignore"` applies it.
    - `unroll`: the unroll of the `lax.scan` over `steps_per_call` steps, as for
        `jax.lax.scan`. `"auto"` (default) unrolls fully on CPU when the step has
        a convolution (XLA:CPU runs a rolled loop over convolutions some 30x
        slower) and keeps the loop rolled otherwise (as fast or faster for dense
        models, and much quicker to compile).
    - `compiler_options`: XLA options for compiling this step only, as for
        `jax.jit`; e.g. `{"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}`
        reduces the gradients one leaf at a time, which lowers the peak memory of
        a donated step on several CPU devices (see [Donation][donation] in
        Performance).
    - `devices`: the devices to run on (default: every device of the backend);
        the batch's device axis has one entry per device of this process.
    - `shard_optimizer_state`: `backend="sharded"` only: keep 1/N of the
        optimizer state on each of the N devices (ZeRO stage 1): the gradients
        are reduce-scattered, each device updates its slice of every parameter
        leaf (cut along the leaf's largest axis that divides by N; leaves with
        no such axis stay whole) and the update slices are all-gathered.
        Results equal the replicated step; the returned state's `opt_state`
        leaves are global arrays laid out over the devices (checkpoints store
        and restore them into either layout). Needs an elementwise optimizer
        (Adam, SGD, momentum, weight decay, schedules): one that reduces over a
        leaf (`optax.clip_by_global_norm`, LAMB) is refused with a `ValueError`
        at the first call.

    **Returns:**

    A function `(state, batch) -> (state, metrics)`.
    """
    as_schedule(learning_rate_fn)  # checked now, not when the step is traced
    check_callables(
        criterion=criterion, metrics_fn=metrics_fn, train_step_fn=train_step_fn
    )
    post = check_post_lst(post_lst)
    if post:

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

    return _build(
        per_device,
        returns_state=True,
        backend=backend,
        devices=devices,
        donate=donate,
        steps_per_call=steps_per_call,
        unroll=unroll,
        nan_policy=nan_policy,
        compiler_options=compiler_options,
        shard_optimizer_state=shard_optimizer_state,
    )


def _without_opt_state(state: TrainState) -> TrainState:
    # What `eval_step` reads. Placing a sharded optimizer state (ZeRO) whole on
    # every device would gather it: evaluation leaves it where it is.
    return state.replace(opt_state=None)


def parallel_eval_step(
    criterion: Criterion,
    metrics_fn: MetricsFn,
    *,
    eval_step_fn: Callable[..., Metrics] = eval_step,
    backend: Backend = "pmap",
    devices: Sequence[Any] | None = None,
) -> Callable[[TrainState, Batch], Metrics]:
    """Build a data-parallel evaluation step over every device.

    **Arguments:**

    - `criterion`, `metrics_fn`: as for [`eqx_steps.eval_step`][].
    - `eval_step_fn`: the per-device step (default [`eqx_steps.eval_step`][]).
    - `backend`, `devices`: as for [`eqx_steps.parallel_train_step`][].

    **Returns:**

    A function `(state, batch) -> metrics`, metrics averaged over devices; the
    state is neither changed nor donated. It has `.lower` and `.cache_size` as
    the training step has. With the default `eval_step_fn`, which does not read
    the optimizer state, the state's `opt_state` is not passed to the devices
    (a sharded one, from `shard_optimizer_state=True`, is never gathered); a
    custom `eval_step_fn` gets the whole state.
    """

    check_callables(
        criterion=criterion, metrics_fn=metrics_fn, eval_step_fn=eval_step_fn
    )

    def per_device(state, batch):
        return eval_step_fn(state, batch, criterion, metrics_fn, axis_name=DEVICE_AXIS)

    return _build(
        per_device,
        returns_state=False,
        backend=backend,
        devices=devices,
        donate=False,
        steps_per_call=1,
        unroll=1,
        nan_policy="ignore",
        compiler_options=None,
        view=_without_opt_state if eval_step_fn is eval_step else None,
    )

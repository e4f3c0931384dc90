"""Pure per-device step functions: `train_step`, `train_step_post`, `eval_step`.

They know nothing about loops, files or devices except the collective axis name
they are given; `axis_name=None` means no collective (one device, or `jit` over a
sharded batch). The parallel wrappers in `eqx_steps.parallel` run them on every
device.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PyTree, Scalar

from ._collectives import (
    device_mean,
    mean_model_state,
    step_key,
    warn_per_device_statistics,
)
from ._step_checks import (
    apply_forward,
    call_criterion,
    check_inputs,
    check_post_lst,
    check_step_batch,
    model_label,
)
from .schedules import as_schedule
from .state import TrainState


AxisName = Hashable | Sequence[Hashable] | None
Batch = Mapping[str, Any]
Metrics = dict[str, Scalar]
Criterion = Callable[[Array, Array], Scalar]
MetricsFn = Callable[[Array, Array, Criterion], Mapping[str, Scalar]]
PostFn = Callable[[PyTree], PyTree]


def _is_injected(s: Any) -> bool:
    # optax.inject_hyperparams states (InjectHyperparamsState and its stateful
    # variant) carry a `hyperparams` dict.
    return isinstance(getattr(s, "hyperparams", None), dict)


def _injected_learning_rate(opt_state: optax.OptState) -> Scalar | None:
    """The learning rate an `optax.inject_hyperparams` optimizer holds (the first
    one), or `None`."""
    found = [
        s.hyperparams["learning_rate"]
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected)
        if _is_injected(s) and "learning_rate" in s.hyperparams
    ]
    return jnp.asarray(found[0], jnp.float32) if found else None


def _check_trainable(params: PyTree, model: Any) -> None:
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(
            f"the model ({model_label(model)}) has no trainable array: nothing to "
            "optimise. Pass an Equinox module holding parameters (e.g. "
            "`eqx.nn.MLP(...)`, not a plain function), or a `trainable` filter that "
            "selects some of its floating-point arrays."
        )


def train_step(
    state: TrainState,
    batch: Batch,
    learning_rate_fn: optax.ScalarOrSchedule | None,
    criterion: Criterion,
    metrics_fn: MetricsFn,
    *,
    axis_name: AxisName = "device",
) -> tuple[TrainState, Metrics]:
    """One optimisation step on one device's share of a batch.

    Computes `criterion(output, batch["label"])` with `output` from
    `state.forward(model, model_state, batch["image"])`, its gradient with respect
    to the trainable leaves, averages the gradients over `axis_name` (unless
    `state.tx` has `reduces_gradients = True`, as the optimizer of
    `shard_optimizer_state=True` has: its `update` then reduces each device's own
    gradients itself), applies the optimizer and stores the new model state
    (BatchNorm statistics, their floating leaves averaged over `axis_name` so every
    device holds the same state).

    **Arguments:**

    - `state`: the current [`eqx_steps.TrainState`][].
    - `batch`: a dict with `"image"` (input) and `"label"` (target) arrays, leading
        axis = examples on this device.
    - `learning_rate_fn`: the schedule (or a constant learning rate, a float),
        evaluated at the step before the update for the `"learning_rate"` metric;
        `None` reads the learning rate from an optimizer built with
        `optax.inject_hyperparams`, and records none for another optimizer.
    - `criterion`: the loss, `criterion(output, label) -> scalar` (the model's
        output first; a criterion that fails so but works with its arguments
        swapped is named as reversed).
    - `metrics_fn`: `metrics_fn(output, label, criterion) -> dict` of scalars.
    - `axis_name`: the collective axis to average over (`"device"`), or `None`.

    **Returns:**

    A 2-tuple of the new state (`step` + 1) and the metrics, averaged over
    `axis_name`, with `"learning_rate"` added (unless `learning_rate_fn` is
    `None` and the optimizer holds no learning rate).

    **Raises** (when the step is traced, naming the fix): a model with no
    trainable array, a call signature that does not fit the key convention
    (`__call__` must accept `key=None`; no `key` parameter while the state holds
    a key), a random layer (Dropout) without a key, a criterion with reversed
    arguments. On more than one device, BatchNorm layers with
    `axis_name="batch"` alone give a warning: their statistics are per device
    (`axis_name=("device", "batch")` makes them whole-batch).
    """
    check_step_batch(batch)
    check_inputs(state, batch)
    schedule = as_schedule(learning_rate_fn)
    x, label = batch["image"], batch["label"]
    params, static = eqx.partition(state.model, state.trainable)
    _check_trainable(params, state.model)
    warn_per_device_statistics(state.model, axis_name)
    key = step_key(state, axis_name)

    def loss_fn(params):
        model = eqx.combine(params, static)
        output, model_state = apply_forward(state, model, x, key=key)
        loss = call_criterion(criterion, "criterion", output, label)
        if jnp.shape(loss) != ():
            raise ValueError(
                f"`criterion` returned an array of shape {jnp.shape(loss)}; it must "
                "return a scalar loss (e.g. the mean over the batch)."
            )
        return loss, (output, model_state)

    (_, (output, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    if not getattr(state.tx, "reduces_gradients", False):  # ZeRO reduce-scatters
        grads = device_mean(grads, axis_name)
    metrics = _metrics(metrics_fn, output, label, criterion, axis_name)
    new_state = state.apply_gradients(
        grads, model_state=mean_model_state(model_state, axis_name)
    )
    if schedule is None:
        rate = _injected_learning_rate(new_state.opt_state)
        if rate is not None:
            metrics["learning_rate"] = rate
    else:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return new_state, metrics


def _metrics(
    metrics_fn: MetricsFn,
    output: PyTree,
    label: PyTree,
    criterion: Criterion,
    axis_name: AxisName,
) -> Metrics:
    found = call_criterion(metrics_fn, "metrics_fn", output, label, criterion)
    return dict(device_mean(dict(found), axis_name))


def _apply_post(model: PyTree, trainable: Any, post_lst: Sequence[PostFn]) -> PyTree:
    """Apply the post-processors in order to the trainable leaves of `model`.

    Each post-processor sees `eqx.filter(model, trainable)` (non-trainable leaves
    are `None`), so frozen leaves never change. A post-processor that changes the
    structure, shapes or dtypes of what it is given raises `ValueError`.
    """
    params, static = eqx.partition(model, trainable)
    for i, post in enumerate(post_lst):
        new = post(params)
        before = jax.tree_util.tree_structure(params)
        after = jax.tree_util.tree_structure(new)
        same = before == after and all(
            jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)
            for a, b in zip(
                jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new)
            )
        )
        if not same:
            raise ValueError(
                f"`post_lst[{i}]` ({getattr(post, '__name__', post)!r}) changed the "
                "model's structure, shapes or dtypes; a post-processor must return a "
                "model of the same structure (use a tree map over its leaves, e.g. "
                "`functools.partial(eqx_steps.clip_range, traversal=..., minval=...)`)."
            )
        params = new
    return eqx.combine(params, static)


def train_step_post(
    state: TrainState,
    batch: Batch,
    learning_rate_fn: optax.Schedule | None,
    criterion: Criterion,
    train_step_fn: Callable[..., tuple[TrainState, Metrics]],
    metrics_fn: MetricsFn,
    post_lst: Sequence[PostFn],
    *,
    axis_name: AxisName = "device",
) -> tuple[TrainState, Metrics]:
    """A training step followed by post-processing of the model.

    Runs `train_step_fn` and then applies each function of `post_lst` in order to
    the trainable leaves of the updated model (e.g. `clip_positive`,
    `spectral_normalization_conv`), as SCICO's `train_step_post`.

    **Arguments:**

    - `state`, `batch`, `learning_rate_fn`, `criterion`, `metrics_fn`, `axis_name`:
        as for [`eqx_steps.train_step`][].
    - `train_step_fn`: the training step to run first, with `train_step`'s
        signature.
    - `post_lst`: post-processors `model -> model`, applied in order.

    **Returns:**

    A 2-tuple of the new state and the metrics of `train_step_fn`.
    """
    post_lst = check_post_lst(post_lst)
    new_state, metrics = train_step_fn(
        state, batch, learning_rate_fn, criterion, metrics_fn, axis_name=axis_name
    )
    model = _apply_post(new_state.model, new_state.trainable, post_lst)
    return new_state.replace(model=model), metrics


def eval_step(
    state: TrainState,
    batch: Batch,
    criterion: Criterion,
    metrics_fn: MetricsFn,
    *,
    axis_name: AxisName = "device",
) -> Metrics:
    """Evaluate the model on one device's share of a batch, changing nothing.

    SCICO's `eval_step`: the model runs in inference mode
    (`eqx.nn.inference_mode` applied to the model itself, so whatever the
    `forward`: Dropout is off, BatchNorm uses its running statistics) on the
    device's batch, and the metrics are `metrics_fn` on that whole batch,
    averaged over `axis_name`. [`eqx_steps.evaluate_dataset`][] combines them
    over the batches of a dataset.

    **Arguments:**

    - `state`: the [`eqx_steps.TrainState`][].
    - `batch`: a dict with `"image"` (input) and `"label"` (target) arrays, leading
        axis = examples on this device.
    - `criterion`: the loss, `criterion(output, label) -> scalar`.
    - `metrics_fn`: `metrics_fn(output, label, criterion) -> dict` of scalars.
    - `axis_name`: the collective axis to average over, or `None`.

    **Returns:**

    The dict of metrics.
    """
    check_step_batch(batch)
    check_inputs(state, batch, training=False)
    x, label = batch["image"], batch["label"]
    # Inference mode on the model itself (Dropout off, BatchNorm's running
    # statistics), whatever the `forward` does with its `inference` flag.
    model = eqx.nn.inference_mode(state.model)
    output, _ = apply_forward(state, model, x, inference=True)
    return _metrics(metrics_fn, output, label, criterion, axis_name)

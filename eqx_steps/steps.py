"""Pure per-device step functions: `train_step`, `train_step_post`, `eval_step`.

They know nothing about loops, files or devices except the collective axis name
they are given; `axis_name=None` means no collective (one device, or `jit` over a
sharded batch). The parallel wrappers in `eqx_steps.parallel` run them on every
device.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._axis_check import check_axis_names
from ._forward import (
    check_inputs_layout,
    per_example,
    per_example_args,
    per_example_kwargs,
    whole_batch,
)
from ._model_checks import check_model_state, ModelStateError
from ._validate import is_integer_image
from .schedules import as_schedule
from .state import BATCH_AXIS, TrainState


AxisName = Hashable | Sequence[Hashable] | None
Batch = Mapping[str, Any]
Metrics = dict[str, Scalar]
Criterion = Callable[[Array, Array], Scalar]
MetricsFn = Callable[[Array, Array, Criterion], Mapping[str, Scalar]]
PostFn = Callable[[PyTree], PyTree]


def _check_batch(batch: Any, argname: str = "batch") -> None:
    """Raise a clear error unless `batch` is a mapping with "image" and "label"."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"`{argname}` must be a dict with keys 'image' and 'label', got "
            f"{type(batch).__name__}; build batches as "
            "{'image': inputs, 'label': targets}."
        )
    missing = [k for k in ("image", "label") if k not in batch]
    if missing:
        raise ValueError(
            f"`{argname}` has keys {sorted(batch)} but lacks {missing}; the steps read "
            "batch['image'] (input) and batch['label'] (target): rename your keys."
        )


def _check_callables(**functions: Any) -> None:
    """Raise `TypeError` naming the first of `functions` that is not callable."""
    for name, fn in functions.items():
        if not callable(fn):
            raise TypeError(
                f"`{name}` must be a function, got {type(fn).__name__}: {fn!r}; pass "
                "the function itself (e.g. eqx_steps.mse_loss, "
                "eqx_steps.compute_metrics, eqx_steps.train_step)."
            )


def _check_post_lst(post_lst: Any) -> tuple[PostFn, ...]:
    """`post_lst` as a tuple, checked to be a sequence of callables."""
    if post_lst is None:
        return ()
    if not isinstance(post_lst, Sequence) or isinstance(post_lst, str):
        raise TypeError(
            f"`post_lst` must be a list of functions model -> model, got "
            f"{type(post_lst).__name__}: {post_lst!r}; pass e.g. "
            "[functools.partial(eqx_steps.clip_positive, traversal=...)]."
        )
    for i, post in enumerate(post_lst):
        if not callable(post):
            raise TypeError(
                f"`post_lst[{i}]` must be a function model -> model, got "
                f"{type(post).__name__}: {post!r}; pass the function itself, e.g. "
                "functools.partial(eqx_steps.clip_positive, traversal=...)."
            )
    return tuple(post_lst)


def _model_dtypes(model: PyTree) -> set[Any]:
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    return {jnp.dtype(x.dtype) for x in leaves}


STOCK_FORWARDS = (per_example, whole_batch, per_example_args, per_example_kwargs)


def _name(model: Any) -> str:
    return getattr(model, "__name__", None) or type(model).__name__


def _signature(model: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(model)
    except (TypeError, ValueError):
        return None


def check_key_convention(model: Any, key: Any, *, training: bool) -> None:
    """Raise a `TypeError` naming the fix when the model's call signature does
    not fit how the stock `forward`s pass `key` (only when a key is given, and
    never at evaluation)."""
    sig = _signature(model)
    if sig is None:
        return
    params = sig.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    param = params.get("key")
    call = f"`{_name(model)}.__call__{sig}`"
    if param is not None and param.kind not in (param.VAR_POSITIONAL,):
        if param.default is param.empty:
            raise TypeError(
                f"{call} requires `key`, but evaluation (and a state without a key) "
                "calls the model without one: `__call__` must accept `key=None` "
                "(e.g. `def __call__(self, x, *, key=None)`, as Equinox's layers "
                "do), and use the key only when it is given."
            )
        return
    if training and key is not None and not takes_any:
        raise TypeError(
            f"the state holds a PRNG key (TrainState.create(..., key=...), "
            f"BasicTrainer(..., key=...)), so the steps call the model with `key=`, "
            f"but {call} takes no `key`: do not pass `key` (leave it None) for a "
            "model without random layers, or give `__call__` a `key=None` "
            "parameter and hand it to its Dropout layers."
        )


def _check_inputs(state: TrainState, batch: Batch, *, training: bool = True) -> None:
    """Check what the stock `forward`s hand the model, before it is traced.

    With a stock `forward` ([`eqx_steps.per_example`][],
    [`eqx_steps.per_example_args`][], [`eqx_steps.per_example_kwargs`][],
    [`eqx_steps.whole_batch`][]; a custom `forward` may convert its inputs
    itself): the model is callable, its `model_state` belongs to it, its call
    signature fits the key convention, the input has the layout the `forward`
    unpacks, and every floating leaf of `batch["image"]` has the model's
    floating dtype when all of its floating leaves share one (XLA's convolutions
    refuse mixed dtypes). Integer and boolean leaves (token ids, masks) are
    passed as they are. Runs when a step is traced, so it costs nothing per call.
    """
    if state.forward not in STOCK_FORWARDS:
        return
    if not callable(state.model):
        raise TypeError(
            f"`state.model` must be callable (an Equinox module with `__call__`), "
            f"got {type(state.model).__name__}; pass the model itself to "
            "TrainState.create (not, e.g., its parameters), or a `forward` that "
            "knows how to apply it."
        )
    check_model_state(state.model, state.model_state, "state.model_state")
    check_key_convention(state.model, state.key, training=training)
    check_inputs_layout(state.forward, batch["image"], "batch['image']")
    dtypes = _model_dtypes(state.model)
    image = batch["image"]
    if state.forward in (per_example, whole_batch) and is_integer_image(image):
        want = next(iter(dtypes)) if len(dtypes) == 1 else jnp.dtype(jnp.float32)
        raise ValueError(
            f"`batch['image']` has dtype {jnp.result_type(image)}: integer images "
            f"(pixel values), but the model takes floating-point inputs; cast the "
            f"images first, e.g. `images.astype(jnp.{want})` (create_input_iter, "
            "and so BasicTrainer, casts integer images as SCICO does). Integer "
            "inputs that are not images (token ids: a signed integer array of "
            "shape (n, T)) are passed as they are."
        )
    for path, x in jax.tree_util.tree_flatten_with_path(image)[0]:
        dtype = jnp.result_type(x)
        name = f"batch['image']{jax.tree_util.keystr(path)}"
        if not jnp.issubdtype(dtype, jnp.inexact):
            continue  # token ids, class indices, masks: the model's business
        if len(dtypes) == 1 and dtype not in dtypes:
            want = next(iter(dtypes))
            raise ValueError(
                f"`{name}` has dtype {dtype}, but the model's floating-point leaves "
                f"are {want}; cast the images with `images.astype(jnp.{want})`, or "
                f"build the model in {dtype} (with x64 on, Equinox layers default to "
                "float64)."
            )


def _describe(x: PyTree) -> str:
    leaves = jax.tree_util.tree_leaves(x)
    return ", ".join(f"{jnp.result_type(a)}{list(jnp.shape(a))}" for a in leaves)


def _apply_forward(
    state: TrainState, model: PyTree, x: PyTree, **kwargs: Any
) -> tuple[PyTree, eqx.nn.State | None]:
    """`state.forward(model, state.model_state, x, **kwargs)`, naming the batch when
    the model cannot take it (an error raised while tracing the model, e.g. a
    shape mismatch inside a layer), and the state's key when a random layer
    needs one. Runs when a step is traced: no cost per call.
    """
    try:
        return state.forward(model, state.model_state, x, **kwargs)
    except ModelStateError:
        raise
    except NameError as e:  # a layer's collective over an axis no step binds
        check_axis_names(model, e)
        raise
    except RuntimeError as e:
        if "requires a key" not in str(e):
            raise
        raise RuntimeError(
            f"a random layer of the model needs a key in training ({e}); the steps "
            "pass one only when the state holds a PRNG key: create the state with "
            "`TrainState.create(model, tx, key=jax.random.key(0))` (or "
            "`BasicTrainer(..., key=jax.random.key(0))`); each step, device and "
            "example then gets its own key."
        ) from e
    except (TypeError, ValueError) as e:
        check_axis_names(model, e)
        first = (str(e).strip().splitlines() or [""])[0]
        ints = any(
            not jnp.issubdtype(jnp.result_type(a), jnp.inexact)
            for a in jax.tree_util.tree_leaves(x)
        )
        hint = (
            " Integer inputs are passed as they are (token ids): cast images with "
            "`images.astype(jnp.float32)`."
            if ints
            else ""
        )
        raise ValueError(
            f"the model cannot take `batch['image']` of {_describe(x)} (per device) "
            f"({type(e).__name__}: {first}); give each example the shape and dtype "
            "the model takes (channels last, (H, W, C) for the reference models), "
            "pass a model of several inputs its inputs as a tuple with "
            "forward=eqx_steps.per_example_args, or pass a `forward` that adapts "
            f"the batch.{hint}"
        ) from e


def _criterion(
    fn: Callable[..., Any], name: str, output: PyTree, label: PyTree, *rest: Any
) -> Any:
    """`fn(output, label, *rest)`, naming reversed arguments when the call fails
    and `fn(label, output, *rest)` traces (runs when the step is traced)."""
    try:
        return fn(output, label, *rest)
    except (TypeError, ValueError) as e:
        try:
            jax.eval_shape(lambda a, b: fn(a, b, *rest), label, output)
        except Exception:  # noqa: BLE001 - not reversed: the original error stands
            raise e from None
        raise ValueError(
            f"`{name}` fails on (output, label) ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]}) but works on (label, "
            "output): its arguments look reversed. The steps call "
            f"`{name}(output, label)` (the model's output first, as optax's losses "
            "take (predictions, targets)): swap its parameters."
        ) from e


class BatchStatisticsWarning(UserWarning):
    """BatchNorm layers compute their statistics per device on several devices.

    Raised (as a warning, once per compiled step) by the training steps when the
    model's `eqx.nn.BatchNorm` layers have `axis_name="batch"` alone and the
    step runs on more than one device: each device then normalises over its own
    share of the batch (SCICO's and Flax's behaviour), where a plain Equinox loop
    under `jax.jit` normalises over the whole batch. `axis_name=("device",
    "batch")` gives whole-batch statistics on any device count. The reference
    models of `eqx_steps.models` keep SCICO's per-device statistics by design and
    raise no warning.
    """


def _batch_norms_per_device(model: PyTree) -> list[str]:
    """The paths of the `eqx.nn.BatchNorm` layers with `axis_name="batch"` alone,
    except this library's reference models' (SCICO's architectures, whose
    per-device statistics are SCICO's by design and documented)."""
    is_bn = lambda x: isinstance(x, eqx.nn.BatchNorm)  # noqa: E731
    return [
        jax.tree_util.keystr(path) or "(the model)"
        for path, layer in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_bn)[0]
        if is_bn(layer)
        and layer.axis_name == BATCH_AXIS
        and not type(layer).__module__.startswith("eqx_steps.")
    ]


def _warn_per_device_statistics(model: PyTree, axis_name: AxisName) -> None:
    """Warn (once per compiled step) when BatchNorm layers normalise over each
    device's examples only while the step runs on several devices."""
    if _no_collective(axis_name):
        return
    layers = _batch_norms_per_device(model)
    if layers:
        warnings.warn(
            f"the model's BatchNorm layers {', '.join(layers[:3])} normalise over "
            f'`axis_name="batch"` alone: on these {jax.lax.axis_size(axis_name)} '
            "devices each computes its statistics over its own share of the batch "
            "(SCICO's and Flax's behaviour), unlike a plain Equinox loop under "
            "jit, which normalises over the whole batch. Build them with "
            '`axis_name=("device", "batch")` for whole-batch statistics (the '
            "same on any device count), or silence this with "
            "`warnings.filterwarnings('ignore', "
            "category=eqx_steps.BatchStatisticsWarning)`.",
            BatchStatisticsWarning,
            stacklevel=2,
        )


def _no_collective(axis_name: AxisName) -> bool:
    # `None`, or an axis of one device: a mean over it is the identity. Skipping
    # it matters: XLA keeps a one-device all-reduce, with a second copy of every
    # gradient alive across it.
    return axis_name is None or jax.lax.axis_size(axis_name) == 1


def _pmean(tree: PyTree, axis_name: AxisName) -> PyTree:
    """`lax.pmean` over `axis_name`; the identity when it is `None` or has size 1."""
    if _no_collective(axis_name):
        return tree
    # One collective per leaf (XLA:CPU combines them by default): with its
    # all-reduce combiner off, XLA can then reduce and apply one gradient at a
    # time instead of keeping all of them alive twice (docs/performance.md).
    return jax.tree_util.tree_map(lambda x: jax.lax.pmean(x, axis_name), tree)


def _mean_model_state(
    model_state: eqx.nn.State | None, axis_name: AxisName
) -> eqx.nn.State | None:
    """Average the floating-point leaves of `model_state` over `axis_name`.

    Integer leaves (counters) are equal on every device and are left as they are.
    """
    if model_state is None or _no_collective(axis_name):
        return model_state
    return jax.tree_util.tree_map(
        lambda x: jax.lax.pmean(x, axis_name) if eqx.is_inexact_array(x) else x,
        model_state,
    )


def _step_key(state: TrainState, axis_name: AxisName) -> PRNGKeyArray | None:
    # One key per (step, device); `forward` splits it per example. Derived, not
    # carried, so a resumed run draws exactly the same keys.
    if state.key is None:
        return None
    key = jr.fold_in(state.key, state.step)
    if axis_name is not None:
        key = jr.fold_in(key, jax.lax.axis_index(axis_name))
    return key


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
            f"the model ({_name(model)}) has no trainable array: nothing to "
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
    _check_batch(batch)
    _check_inputs(state, batch)
    schedule = as_schedule(learning_rate_fn)
    x, label = batch["image"], batch["label"]
    params, static = eqx.partition(state.model, state.trainable)
    _check_trainable(params, state.model)
    _warn_per_device_statistics(state.model, axis_name)
    key = _step_key(state, axis_name)

    def loss_fn(params):
        model = eqx.combine(params, static)
        output, model_state = _apply_forward(state, model, x, key=key)
        loss = _criterion(criterion, "criterion", output, label)
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
        grads = _pmean(grads, axis_name)
    metrics = _metrics(metrics_fn, output, label, criterion, axis_name)
    new_state = state.apply_gradients(
        grads, model_state=_mean_model_state(model_state, axis_name)
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
    found = _criterion(metrics_fn, "metrics_fn", output, label, criterion)
    return dict(_pmean(dict(found), axis_name))


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
    post_lst = _check_post_lst(post_lst)
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
    _check_batch(batch)
    _check_inputs(state, batch, training=False)
    x, label = batch["image"], batch["label"]
    # Inference mode on the model itself (Dropout off, BatchNorm's running
    # statistics), whatever the `forward` does with its `inference` flag.
    model = eqx.nn.inference_mode(state.model)
    output, _ = _apply_forward(state, model, x, inference=True)
    return _metrics(metrics_fn, output, label, criterion, axis_name)

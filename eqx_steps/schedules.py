"""Learning-rate schedules built from a SCICO-style config mapping.

Each function builds exactly the optax schedule that SCICO's
`scico.flax.train.learning_rate` builds, reading the same config keys. They
take the config of the trainer (a `dict`, a `TypedDict`, any `Mapping`, or a
dataclass such as `TrainConfig`); a missing key raises a `KeyError` that names
the key and the schedule that needs it.

`as_schedule` is the one place where a constant learning rate (a float) becomes
a schedule: every function that takes a schedule accepts a float through it.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, overload

import jax
import jax.numpy as jnp
import optax

from ._validate import check_int, check_number, is_real


@overload
def as_schedule(learning_rate: None, name: str = ...) -> None: ...
@overload
def as_schedule(
    learning_rate: optax.ScalarOrSchedule, name: str = ...
) -> optax.Schedule: ...
def as_schedule(
    learning_rate: optax.ScalarOrSchedule | None, name: str = "learning_rate_fn"
) -> optax.Schedule | None:
    """A learning-rate schedule from a schedule or a constant learning rate.

    Every function of this library that takes a schedule (`train_step`,
    `parallel_train_step`, `create_basic_train_state`, the result of a config's
    `lr_schedule`) accepts a plain number through this function.

    **Arguments:**

    - `learning_rate`: an optax schedule (any function `step -> learning rate`),
        a finite number `>= 0` (a constant schedule), a scalar JAX array, or
        `None` (left as `None`: "read it from the optimizer state", see
        [`eqx_steps.train_step`][]).
    - `name`: the argument's name, for error messages.

    **Returns:**

    The schedule (`optax.constant_schedule(learning_rate)` for a number).

    **Raises:**

    `TypeError` for anything else, `ValueError` for a negative or non-finite
    number.
    """
    if learning_rate is None:
        return None
    if callable(learning_rate):
        return _checked(learning_rate, name)
    if isinstance(learning_rate, jax.Array) and learning_rate.ndim == 0:
        return optax.constant_schedule(learning_rate)
    if not is_real(learning_rate):
        raise TypeError(
            f"`{name}` must be a schedule (a function step -> learning rate) or a "
            f"number, got {learning_rate!r} ({type(learning_rate).__name__})."
        )
    return optax.constant_schedule(check_number(name, learning_rate, minimum=0.0))


def _checked(schedule: optax.Schedule, name: str) -> optax.Schedule:
    """`schedule`, checked (by tracing it once, nothing is run) to map an integer
    step to a real scalar."""
    fix = "a schedule must map the step (an int32 scalar) to a real scalar, e.g. "
    fix += "`optax.exponential_decay(1e-3, 1000, 0.5)`."
    try:
        out = jax.eval_shape(schedule, jax.ShapeDtypeStruct((), jnp.int32))
    except Exception as e:  # noqa: BLE001 - whatever the user's function raises
        raise TypeError(
            f"`{name}` = {schedule!r} fails on a traced step ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); {fix}"
        ) from e
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if (
        shape != ()
        or dtype is None
        or not (
            jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
        )
    ):
        got = f"shape {shape} and dtype {dtype}" if dtype is not None else repr(out)
        raise TypeError(f"`{name}` = {schedule!r} returns {got}; {fix}")
    return schedule


def _as_mapping(config: Any, schedule: str) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    raise TypeError(
        f"{schedule}: `config` must be a mapping (a dict or ConfigDict) or a config "
        f"dataclass, got {type(config).__name__}: {config!r}."
    )


def _get(
    config: Mapping[str, Any],
    key: str,
    schedule: str,
    *,
    integer: bool = False,
    positive: bool = False,
    nonnegative: bool = False,
) -> Any:
    """Read `config[key]`, checked to be a finite number (an integer if asked)."""
    if key not in config:
        raise KeyError(
            f"{schedule}: the config has no {key!r}, which this schedule needs; "
            f"add config[{key!r}] (present keys: {sorted(map(str, config))})."
        )
    name = f"config[{key!r}]"
    try:
        if integer:
            return check_int(name, config[key], minimum=1 if positive else 0)
        minimum = 0.0 if nonnegative else None
        return check_number(name, config[key], minimum=minimum, positive=positive)
    except (TypeError, ValueError) as e:  # the same error, naming the schedule
        raise type(e)(f"{schedule}: {e}") from None


def create_cnst_lr_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """A constant learning rate, `config["base_learning_rate"]`.

    SCICO's `create_cnst_lr_schedule`: `optax.constant_schedule(base_learning_rate)`.

    **Arguments:**

    - `config`: the training config; reads `base_learning_rate` (>= 0).

    **Returns:**

    An `optax.Schedule` mapping a step count to the learning rate.
    """
    name = "create_cnst_lr_schedule"
    config = _as_mapping(config, name)
    lr = _get(config, "base_learning_rate", name, nonnegative=True)
    return optax.constant_schedule(lr)


def create_exp_lr_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """An exponentially decaying learning rate, SCICO's `create_exp_lr_schedule`.

    `optax.exponential_decay(base_learning_rate, num_epochs * steps_per_epoch,
    lr_decay_rate)`, that is

        lr(step) = base_learning_rate * lr_decay_rate ** (step / decay_steps)
        decay_steps = num_epochs * steps_per_epoch

    continuous (not staircase) and starting at step 0. Note that
    `lr_decay_rate` is the factor over the *whole run*, not per epoch: the last
    step of training has about `base_learning_rate * lr_decay_rate`, and the
    decay carries on past it.

    **Arguments:**

    - `config`: the training config; reads `base_learning_rate` (>= 0),
        `num_epochs` (> 0), `steps_per_epoch` (a positive integer; SCICO's
        trainer sets it to `len(train_ds) // batch_size`) and `lr_decay_rate`
        (> 0).

    **Returns:**

    An `optax.Schedule` mapping a step count to the learning rate.
    """
    name = "create_exp_lr_schedule"
    config = _as_mapping(config, name)
    lr = _get(config, "base_learning_rate", name, nonnegative=True)
    num_epochs = _get(config, "num_epochs", name, positive=True)
    steps_per_epoch = _get(config, "steps_per_epoch", name, integer=True, positive=True)
    decay_rate = _get(config, "lr_decay_rate", name, positive=True)
    decay_steps = num_epochs * steps_per_epoch
    return optax.exponential_decay(lr, decay_steps, decay_rate)


def create_cosine_lr_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """Linear warm-up then cosine decay to zero, SCICO's `create_cosine_lr_schedule`.

    With `W = warmup_epochs * steps_per_epoch` and
    `C = max(num_epochs - warmup_epochs, 1) * steps_per_epoch`:

    - for `step < W`: `lr = base_learning_rate * step / W` (so the very first
        step has learning rate 0);
    - for `step >= W`:
        `lr = base_learning_rate * 0.5 * (1 + cos(pi * min(step - W, C) / C))`,
        which reaches 0 at the end of training and stays there.

    This is `optax.join_schedules([linear_schedule(0, base, W),
    cosine_decay_schedule(base, C)], [W])`, as SCICO builds it. With
    `warmup_epochs = 0` there is no warm-up.

    **Arguments:**

    - `config`: the training config; reads `base_learning_rate` (>= 0),
        `num_epochs` (> 0), `warmup_epochs` (>= 0) and `steps_per_epoch` (a
        positive integer).

    **Returns:**

    An `optax.Schedule` mapping a step count to the learning rate.
    """
    name = "create_cosine_lr_schedule"
    config = _as_mapping(config, name)
    lr = _get(config, "base_learning_rate", name, nonnegative=True)
    num_epochs = _get(config, "num_epochs", name, positive=True)
    warmup_epochs = _get(config, "warmup_epochs", name, nonnegative=True)
    steps_per_epoch = _get(config, "steps_per_epoch", name, integer=True, positive=True)

    warmup_steps = warmup_epochs * steps_per_epoch
    warmup_fn = optax.linear_schedule(
        init_value=0.0, end_value=lr, transition_steps=warmup_steps
    )
    cosine_epochs = max(num_epochs - warmup_epochs, 1)
    cosine_fn = optax.cosine_decay_schedule(
        init_value=lr, decay_steps=cosine_epochs * steps_per_epoch
    )
    return optax.join_schedules(
        schedules=[warmup_fn, cosine_fn], boundaries=[warmup_steps]
    )

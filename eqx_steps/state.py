"""The immutable training state (how a model is applied to a batch: `_forward`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from ._forward import BATCH_AXIS as BATCH_AXIS, per_example
from ._model_checks import (
    check_model_state,
    check_same_arrays,
)
from .schedules import as_schedule


DEVICE_AXIS = "device"
"""Name of the data-parallel device axis of the parallel steps."""


class TrainState(eqx.Module):
    """Everything that changes during training, as one immutable PyTree.

    Holds the step counter, the Equinox model, its `eqx.nn.State` (e.g. BatchNorm
    statistics), the optimizer state and an optional PRNG key; the optimizer `tx`,
    the model-calling convention `forward` and the `trainable` filter are static.
    Only the leaves selected by `trainable` are optimised and have optimizer state;
    all other leaves never change. Build one with [`eqx_steps.TrainState.create`][].

    Attribute assignment raises; use [`eqx_steps.TrainState.replace`][].
    """

    step: Int[Array, ""]
    model: PyTree
    model_state: eqx.nn.State | None
    opt_state: optax.OptState
    key: PRNGKeyArray | None
    tx: optax.GradientTransformation = eqx.field(static=True)
    forward: Callable = eqx.field(static=True)
    trainable: Any = eqx.field(static=True)

    @classmethod
    def create(
        cls,
        model: PyTree,
        tx: optax.GradientTransformation,
        *,
        model_state: eqx.nn.State | None = None,
        key: PRNGKeyArray | None = None,
        forward: Callable = per_example,
        trainable: Any = eqx.is_inexact_array,
    ) -> TrainState:
        """Create the initial state of a training run (step 0).

        **Arguments:**

        - `model`: the initialised Equinox model.
        - `tx`: the optax optimizer. Build it once and reuse it: a new optax object
            is a new static value and makes the steps recompile.
        - `model_state`: the model's `eqx.nn.State` (from `eqx.nn.make_with_state`),
            or `None` for a stateless model.
        - `key`: a PRNG key for stochastic layers; each step, device and example
            gets its own key derived from it. `None` passes no key to the model.
        - `forward`: how the model is applied to a per-device batch:
            [`eqx_steps.per_example`][] (default, `model(x)`),
            [`eqx_steps.per_example_args`][] (`model(*inputs)`),
            [`eqx_steps.per_example_kwargs`][] (`model(**inputs)`) or
            [`eqx_steps.whole_batch`][], or any function with their signature.
        - `trainable`: an Equinox filter spec selecting the optimised leaves
            (a callable on leaves, or a PyTree of bools); default
            `eqx.is_inexact_array`.

        **Returns:**

        A `TrainState` with `step` = 0 (an `int32` array) and `tx.init` of the
        trainable leaves.
        """
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"`tx` must be an optax.GradientTransformation, got {type(tx).__name__}"
                "; build one with e.g. `optax.adam(1e-3)`."
            )
        if not callable(forward):
            raise TypeError(f"`forward` must be callable, got {forward!r}.")
        check_model_state(model, model_state)
        if key is not None and not (
            isinstance(key, jax.Array)
            and (
                jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                or (key.dtype == jnp.uint32 and key.shape == (2,))
            )
        ):
            raise TypeError(
                f"`key` must be a PRNG key (jax.random.key(seed)) or None, got {key!r}."
            )
        params = eqx.filter(model, trainable)
        return cls(
            step=jnp.zeros((), jnp.int32),
            model=model,
            model_state=model_state,
            opt_state=tx.init(params),
            key=key,
            tx=tx,
            forward=forward,
            trainable=trainable,
        )

    @property
    def params(self) -> PyTree:
        """The trainable leaves of the model (`eqx.filter(model, trainable)`)."""
        return eqx.filter(self.model, self.trainable)

    def apply_gradients(self, grads: PyTree, **changes: Any) -> TrainState:
        """Apply one optimizer update and advance `step` by one.

        **Arguments:**

        - `grads`: gradients with the structure of `self.params` (non-trainable
            leaves `None`).
        - `**changes`: other fields to replace at the same time (e.g.
            `model_state=...`).

        **Returns:**

        The new state.
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        model = eqx.apply_updates(self.model, updates)
        return self.replace(
            step=self.step + 1, model=model, opt_state=opt_state, **changes
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy of this state with the given fields replaced.

        A new `model` must have the arrays of the old one (same paths, shapes and
        dtypes: the optimizer state and the compiled steps are built for them), and
        `model_state` must belong to the model.

        **Arguments:**

        - `**changes`: field names and their new values.

        **Returns:**

        The new state.

        **Raises:**

        `ValueError` naming the first leaf of `model` that differs, or the entries
        of `model_state` that do not belong to the model.
        """
        if "model" in changes:
            check_same_arrays("model", self.model, changes["model"])
        if "model" in changes or "model_state" in changes:
            check_model_state(
                changes.get("model", self.model),
                changes.get("model_state", self.model_state),
            )
        return dataclasses.replace(self, **changes)


_OPTIMIZERS = ("SGD", "ADAM", "ADAMW")


class _UnknownOptimizerError(ValueError, NotImplementedError):
    """`config["opt_type"]` names no known optimizer.

    Both a `ValueError` (a bad value) and a `NotImplementedError` (what SCICO's
    `create_basic_train_state` raises), so code written for either catches it.
    """


def _is_prng_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and (
        jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        or (x.dtype == jnp.uint32 and x.shape == (2,))
    )


def _refuses_scico_call_order(fn: Callable) -> Callable:
    """Name the fix when `fn` is called as SCICO's `create_basic_train_state(key,
    config, model, ishape, learning_rate_fn)`."""

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 3 or (args and _is_prng_key(args[0])):
            raise TypeError(
                "create_basic_train_state was called as SCICO's "
                "`create_basic_train_state(key, config, model, ishape, "
                "learning_rate_fn)`; eqx_steps takes (config, model, lr_fn): an "
                "Equinox model arrives initialised, so the key and the input shape "
                "are not needed (pass a key for dropout as `key=`). See the "
                "migration guide (docs/migrating-from-scico.md)."
            )
        return fn(*args, **kwargs)

    return checked


@_refuses_scico_call_order
def create_basic_train_state(
    config: Mapping[str, Any],
    model: PyTree,
    learning_rate_fn: optax.Schedule | float,
    *,
    model_state: eqx.nn.State | None = None,
    key: PRNGKeyArray | None = None,
) -> TrainState:
    """Create a `TrainState` with the optimizer named in a SCICO-style config.

    As SCICO's `create_basic_train_state`: `config["opt_type"]` picks `"SGD"`
    (with Nesterov momentum when `config` has `"momentum"`), `"ADAM"` (the default
    when the key is absent) or `"ADAMW"`. An Equinox model arrives initialised, so
    SCICO's key and input-shape arguments are not needed.

    **Arguments:**

    - `config`: a mapping with optional keys `"opt_type"` and `"momentum"`.
    - `model`: the initialised Equinox model.
    - `learning_rate_fn`: an optax schedule (or a constant learning rate).
    - `model_state`: the model's `eqx.nn.State`, or `None`.
    - `key`: a PRNG key for stochastic layers, or `None`.

    **Returns:**

    The initial `TrainState`.

    **Raises:**

    An error that is both a `ValueError` and a `NotImplementedError` (as SCICO
    raises) for an unknown `config["opt_type"]`.
    """
    if learning_rate_fn is None:
        raise TypeError(
            "`learning_rate_fn` is None; pass a schedule (a function step -> learning "
            "rate) or a number."
        )
    as_schedule(learning_rate_fn)  # checked; optax takes a number as it is
    opt_type = config.get("opt_type", "ADAM")
    if opt_type == "SGD":
        if config.get("momentum") is not None:
            tx = optax.sgd(learning_rate_fn, momentum=config["momentum"], nesterov=True)
        else:
            tx = optax.sgd(learning_rate_fn)
    elif opt_type == "ADAM":
        tx = optax.adam(learning_rate_fn)
    elif opt_type == "ADAMW":
        tx = optax.adamw(learning_rate_fn)
    else:
        raise _UnknownOptimizerError(
            f"config['opt_type'] = {opt_type!r} is not a known optimizer; use one of "
            f"{', '.join(map(repr, _OPTIMIZERS))}, or build an optax optimizer and "
            "call `TrainState.create(model, tx)`."
        )
    return TrainState.create(model, tx, model_state=model_state, key=key)

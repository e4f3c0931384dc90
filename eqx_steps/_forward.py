"""How a model is applied to a batch: the forward conventions (`per_example`,
`per_example_args`, `per_example_kwargs`, `whole_batch`) and the model state they
hand the model inside the parallel steps."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._model_checks import (
    MAKE_WITH_STATE,
    ModelStateError,
)


BATCH_AXIS = "batch"
"""Name of the per-example `vmap` axis inside a device (the Equinox convention)."""


# --- Stateful layers inside `shard_map` (and `jax.pmap`, which runs on it) ---------
#
# `eqx.nn.State.set` refuses a new value unless `jax.eval_shape` of the old and the
# new value compare equal. With jax 0.10 the abstract value of anything traced
# inside `shard_map` carries the manual mesh in its sharding, while a constant made
# in the step (`jnp.array(False)`, as `eqx.nn.BatchNorm(mode="ema")` writes its
# "first time" flag) carries none, so `ShapeDtypeStruct.__eq__` says they differ
# and Equinox raises "Old and new values have different structures/shapes/dtypes.
# The old value is bool[] and the new value is bool[]". The forward functions below
# hand the model a `State` whose `set` first gives such a value the old value's
# type (same shape and dtype, so only the mesh annotation changes, and only when
# that is the one difference); every other mismatch still raises as in Equinox.


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    # What `eqx.nn.State.set` compares.
    return jax.eval_shape(lambda: x)


def _like_old(old: Any, new: Any) -> Any:
    """`new`, typed as `old` when they differ only in their sharding annotation."""
    if not (isinstance(old, jax.Array) and isinstance(new, jax.Array)):
        return new
    a, b = _struct(old), _struct(new)
    if a == b or (a.shape, a.dtype, a.weak_type) != (b.shape, b.dtype, b.weak_type):
        return new
    return jnp.where(True, new, old)  # takes `old`'s type; XLA folds it away


@jtu.register_pytree_node_class
class _MeshSafeState(eqx.nn.State):
    """An `eqx.nn.State` whose `set` accepts values built inside `shard_map`."""

    def set(self, item: eqx.nn.StateIndex, value: Any) -> eqx.nn.State:
        old = self.get(item)
        value = jtu.tree_map(jnp.asarray, value)
        if _layout(old) != _layout(value):
            raise ModelStateError(
                f"`model_state` does not belong to `model`: its entry "
                f"{str(item.marker)!r} holds {_describe(old)} but the layer writes "
                f"{_describe(value)} (was the state made for a model of other "
                f"sizes?); pass the state built with this model: {MAKE_WITH_STATE}."
            )
        if jtu.tree_structure(old) == jtu.tree_structure(value):
            value = jtu.tree_map(_like_old, old, value)
        return _as_state(super().set(item, value), _MeshSafeState)

    def substate(self, pytree: PyTree) -> eqx.nn.State:
        return _as_state(super().substate(pytree), _MeshSafeState)

    def update(self, substate: eqx.nn.State) -> eqx.nn.State:
        plain = _as_state(substate, eqx.nn.State)
        return _as_state(super().update(plain), _MeshSafeState)


def _layout(tree: PyTree) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
    leaves, treedef = jtu.tree_flatten(tree)
    return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def _describe(tree: PyTree) -> str:
    return ", ".join(f"{d}{list(s)}" for s, d in _layout(tree)[1]) or "nothing"


def _as_state(state: Any, cls: type[eqx.nn.State]) -> Any:
    """`state` (an `eqx.nn.State` or `None`) as an instance of exactly `cls`."""
    if state is None or type(state) is cls:
        return state
    values, keys = state.tree_flatten()
    return cls.tree_unflatten(keys, values)


def _call(model: PyTree, x: Any, key: Any, state: eqx.nn.State | None) -> Any:
    """`model(x, state, key=key)`, leaving out `state` and `key` when `None`."""
    kwargs = {} if key is None else {"key": key}
    if state is None:
        return model(x, **kwargs), None
    y, state = model(x, _as_state(state, _MeshSafeState), **kwargs)
    return y, _as_state(state, eqx.nn.State)


def _call_args(model: PyTree, x: Any, key: Any, state: eqx.nn.State | None) -> Any:
    """`model(*x, state, key=key)`, leaving out `state` and `key` when `None`."""
    kwargs = {} if key is None else {"key": key}
    if state is None:
        return model(*x, **kwargs), None
    y, state = model(*x, _as_state(state, _MeshSafeState), **kwargs)
    return y, _as_state(state, eqx.nn.State)


def _call_kwargs(model: PyTree, x: Any, key: Any, state: eqx.nn.State | None) -> Any:
    """`model(**x, state=state, key=key)`, leaving out `state` and `key` when
    `None`."""
    kwargs = {} if key is None else {"key": key}
    if state is None:
        return model(**x, **kwargs), None
    y, state = model(**x, state=_as_state(state, _MeshSafeState), **kwargs)
    return y, _as_state(state, eqx.nn.State)


def check_inputs_layout(forward: Callable, x: Any, name: str) -> None:
    """Raise a clear error when `x` is not what `forward` unpacks: a tuple (or
    list) for `per_example_args`, a dict with string keys for
    `per_example_kwargs`."""
    if forward is per_example_args and not isinstance(x, (tuple, list)):
        raise TypeError(
            f"forward=per_example_args calls `model(*inputs)`, so `{name}` must be "
            f"a tuple of arrays (one per input), got {type(x).__name__}; build the "
            "batch as {'image': (x1, x2), 'label': y}, or use forward=per_example "
            "for a model of one input."
        )
    if forward is per_example_kwargs and not (
        isinstance(x, Mapping) and all(isinstance(k, str) for k in x)
    ):
        raise TypeError(
            f"forward=per_example_kwargs calls `model(**inputs)`, so `{name}` must "
            f"be a dict of arrays keyed by argument name, got {type(x).__name__}; "
            "build the batch as {'image': {'x': x, 't': t}, 'label': y}."
        )


def _vmapped(
    call: Callable,
    model: PyTree,
    model_state: eqx.nn.State | None,
    x: Any,
    key: PRNGKeyArray | None,
    inference: bool,
) -> tuple[PyTree[Array], eqx.nn.State | None]:
    if inference:
        model = eqx.nn.inference_mode(model)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    keys = None if key is None else jr.split(key, n)
    key_axis = None if keys is None else 0
    return jax.vmap(
        functools.partial(call, model),
        in_axes=(0, key_axis, None),
        out_axes=(0, None),
        axis_name=BATCH_AXIS,
    )(x, keys, model_state)


def per_example(
    model: PyTree,
    model_state: eqx.nn.State | None,
    x: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[PyTree[Array], eqx.nn.State | None]:
    """Apply `model` to each example of a per-device batch (the default `forward`).

    The model is `jax.vmap`-ed over the leading axis of `x` with axis name
    `"batch"` (`eqx_steps.BATCH_AXIS`), so an `eqx.nn.BatchNorm(axis_name="batch")`
    computes statistics over the examples of this device. The model is called as
    `model(x_i, model_state, key=k_i)`, leaving out `model_state` when it is `None`
    and `key` when it is `None`; each example gets its own key, split from `key`.

    The input is passed as one argument, as SCICO calls its models
    (`model(batch["image"])`), even when it is a tuple or dict; a model of
    several inputs takes them unpacked with [`eqx_steps.per_example_args`][]
    (`model(*inputs)`) or [`eqx_steps.per_example_kwargs`][]
    (`model(**inputs)`). Integer and boolean inputs are passed as they are.

    Stock Equinox stateful layers work in every backend, `eqx.nn.BatchNorm` in
    both modes included: with jax 0.10, `eqx.nn.BatchNorm(mode="ema")` fails
    inside `shard_map` and `jax.pmap` ("Old and new values have different
    structures/shapes/dtypes"), and the `eqx.nn.State` this function hands the
    model works around that (a custom `forward` gets the same by calling this
    function or [`eqx_steps.whole_batch`][]).

    **Arguments:**

    - `model`: an Equinox model taking one example.
    - `model_state`: an `eqx.nn.State` (e.g. BatchNorm statistics), or `None`.
    - `x`: the per-device batch, leading axis = examples.
    - `key`: a PRNG key for stochastic layers (dropout), or `None`.
    - `inference`: run the model under `eqx.nn.inference_mode`.

    **Returns:**

    A 2-tuple of the batched output and the updated `model_state` (unchanged in
    inference mode, `None` when it was `None`).
    """
    return _vmapped(_call, model, model_state, x, key, inference)


def per_example_args(
    model: PyTree,
    model_state: eqx.nn.State | None,
    x: tuple[PyTree[Array], ...],
    *,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[PyTree[Array], eqx.nn.State | None]:
    """Apply a model of several inputs to each example: `model(*inputs)`.

    As [`eqx_steps.per_example`][], for a model called as `model(x, t)`: the
    input of the batch (`batch["image"]`) is a tuple `(x, t)` of arrays with a
    leading example axis, and each example is passed unpacked, as
    `model(x_i, t_i, model_state, key=k_i)` (leaving out `model_state` and `key`
    when they are `None`). Integer inputs (token ids, class indices) are passed
    as they are.

    !!! example

        ```python
        batch = {"image": (x, t), "label": y}   # x: (n, 8), t: (n,) int32
        state = TrainState.create(model, tx, forward=es.per_example_args)
        ```

    **Arguments:** as for [`eqx_steps.per_example`][]; `x` is a tuple (or list)
    of PyTrees of arrays.

    **Returns:**

    A 2-tuple of the batched output and the updated `model_state`.
    """
    check_inputs_layout(per_example_args, x, "batch['image']")
    return _vmapped(_call_args, model, model_state, tuple(x), key, inference)


def per_example_kwargs(
    model: PyTree,
    model_state: eqx.nn.State | None,
    x: Mapping[str, PyTree[Array]],
    *,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[PyTree[Array], eqx.nn.State | None]:
    """Apply a model of several named inputs to each example: `model(**inputs)`.

    As [`eqx_steps.per_example`][], for a model called with keyword arguments:
    the input of the batch (`batch["image"]`) is a dict such as
    `{"tokens": ids, "mask": mask}`, and each example is passed as
    `model(tokens=ids_i, mask=mask_i, state=model_state, key=k_i)` (leaving out
    `state` and `key` when they are `None`: a stateful model takes its
    `eqx.nn.State` as the keyword `state`).

    **Arguments:** as for [`eqx_steps.per_example`][]; `x` is a dict of PyTrees
    of arrays keyed by argument name.

    **Returns:**

    A 2-tuple of the batched output and the updated `model_state`.
    """
    check_inputs_layout(per_example_kwargs, x, "batch['image']")
    return _vmapped(_call_kwargs, model, model_state, dict(x), key, inference)


def whole_batch(
    model: PyTree,
    model_state: eqx.nn.State | None,
    x: PyTree[Array],
    *,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[PyTree[Array], eqx.nn.State | None]:
    """Apply `model` to the whole per-device batch at once.

    For models written for batches (e.g. a model that vmaps itself). The model is
    called as `model(x, model_state, key=key)`, leaving out `model_state` and
    `key` when they are `None`; stateful layers work in every backend, as for
    [`eqx_steps.per_example`][].

    **Arguments:** as for [`eqx_steps.per_example`][].

    **Returns:**

    A 2-tuple of the output and the updated `model_state`.
    """
    if inference:
        model = eqx.nn.inference_mode(model)
    return _call(model, x, key, model_state)

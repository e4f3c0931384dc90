"""Does a `model_state` belong to its model; does a new model have the old arrays?

The checks of `TrainState.create`, `TrainState.replace` and the steps (when they
are traced), in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree


class ModelStateError(ValueError):
    """A `model_state` that does not belong to the model, found while tracing it."""


def _is_index(x: Any) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


def state_markers(model: PyTree) -> list[Any]:
    """The markers of the stateful layers of `model` (its `eqx.nn.StateIndex`es).

    An `eqx.nn.State` made with the model (`eqx.nn.make_with_state`) holds exactly
    one entry per marker.
    """
    leaves = jtu.tree_leaves(model, is_leaf=_is_index)
    return [x.marker for x in leaves if _is_index(x)]


def _batch_norm_sizes(model: PyTree, model_state: eqx.nn.State) -> Iterator[str]:
    """A description of each `eqx.nn.BatchNorm` whose statistics in `model_state`
    are not of its `input_size` (a state made for a model of other widths)."""
    is_bn = lambda x: isinstance(x, eqx.nn.BatchNorm)  # noqa: E731
    for layer in jtu.tree_leaves(model, is_leaf=is_bn):
        if not is_bn(layer):
            continue
        for index in (layer.ema_state_index, layer.batch_state_index):
            if index is None:
                continue
            shapes = [jnp.shape(x) for x in jtu.tree_leaves(model_state.get(index))]
            # `shape[-1:]`: a state replicated for a user's own pmap has a
            # leading device axis.
            if any(shape[-1:] != (layer.input_size,) for shape in shapes):
                yield (
                    f"entry {str(index.marker)!r} holds statistics of shapes "
                    f"{shapes} for a BatchNorm of {layer.input_size} channels"
                )


def _listed(items: list[Any], limit: int = 3) -> str:
    shown = ", ".join(repr(str(x)) for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


MAKE_WITH_STATE = (
    "`model, model_state = eqx.nn.make_with_state(Model)(...)`, then pass both"
)


def check_model_state(
    model: PyTree, model_state: Any, name: str = "model_state"
) -> None:
    """Raise unless `model_state` is the `eqx.nn.State` of `model`'s stateful layers.

    Compares the model's `eqx.nn.StateIndex` markers with the entries of the state
    (the cheap part of what `eqx.nn.State.get` relies on; shapes are checked when
    a layer writes its state, see `_MeshSafeState.set`).

    **Raises:**

    `TypeError` when `model_state` is neither `None` nor an `eqx.nn.State`;
    `ValueError` when it is `None` and the model has stateful layers (e.g.
    `eqx.nn.BatchNorm`), or when its entries are not those of the model's layers.
    """
    markers = state_markers(model)
    if model_state is None:
        if markers:
            raise ValueError(
                f"`{name}` is None but `model` has {len(markers)} layer(s) that keep "
                f"a state (e.g. eqx.nn.BatchNorm: {_listed(markers, 1)}); pass the "
                f"state built with the model: {MAKE_WITH_STATE}."
            )
        return
    if not isinstance(model_state, eqx.nn.State):
        raise TypeError(
            f"`{name}` must be an eqx.nn.State or None, got "
            f"{type(model_state).__name__}; build it with {MAKE_WITH_STATE}."
        )
    _, keys = model_state.tree_flatten()
    missing = [m for m in markers if m not in keys]
    extra = [k for k in keys if k not in markers]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks the entries of the layers {_listed(missing)}")
        if extra:
            parts.append(f"has entries {_listed(extra)} that no layer of `model` uses")
        raise ValueError(
            f"`{name}` does not belong to `model`: it {' and '.join(parts)} (was it "
            "made for another model, e.g. of another depth?); pass the state built "
            f"with this model: {MAKE_WITH_STATE}."
        )
    for wrong in _batch_norm_sizes(model, model_state):
        raise ValueError(
            f"`{name}` does not belong to `model`: its {wrong} (was it made for a "
            "model of other sizes?); pass the state built with this model: "
            f"{MAKE_WITH_STATE}."
        )


def _array_leaves(tree: PyTree) -> list[tuple[str, tuple[int, ...], Any]]:
    """`(path, shape, dtype)` of each array (or `ShapeDtypeStruct`) leaf."""
    out = []
    for path, x in jtu.tree_flatten_with_path(tree)[0]:
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
            out.append((jtu.keystr(path), tuple(x.shape), jnp.dtype(x.dtype)))
    return out


def check_same_arrays(name: str, old: PyTree, new: PyTree) -> None:
    """Raise `ValueError` naming the first array leaf of `new` whose path, shape or
    dtype differs from `old`'s (static fields may differ)."""
    a, b = _array_leaves(old), _array_leaves(new)
    if a == b:
        return
    for (pa, sa, da), (pb, sb, db) in zip(a, b):
        if (pa, sa, da) != (pb, sb, db):
            what = (
                f"leaf {name}{pb} has shape {sb} and dtype {db}, where the state "
                f"has {name}{pa} of shape {sa} and dtype {da}"
            )
            break
    else:
        what = f"it has {len(b)} array leaves where the state has {len(a)}"
    raise ValueError(
        f"`{name}` passed to TrainState.replace has other arrays than the state's: "
        f"{what}. The optimizer state and compiled steps are built for the old "
        f"shapes: pass a `{name}` of the same structure, shapes and dtypes, or "
        "build a new state with `TrainState.create`."
    )

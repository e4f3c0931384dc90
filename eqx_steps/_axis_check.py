"""A clear error for a layer that collects over an axis name the step lacks.

A layer such as `eqx.nn.BatchNorm(axis_name=...)` averages its statistics over
named axes, which must be bound where the model runs: a step binds `"batch"`
(the examples of one device's batch, as `per_example` applies the model) and,
in a parallel step, `"device"`. Any other name makes JAX raise "unbound axis
name ... call psum under jax.shard_map", and `"device"` alone (without
`"batch"`) a vmap error; `check_axis_names` turns both into one error naming
the layers, the names that exist and how to choose. It runs when a step is
traced, only after the model has failed: no cost on a working step.
"""

from __future__ import annotations

import re
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from .state import BATCH_AXIS, DEVICE_AXIS


def _names(axis_name: Any) -> tuple[Any, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, (tuple, list)):
        return tuple(axis_name)
    return (axis_name,)


def _collective_layers(model: Any) -> list[tuple[str, Any, tuple[Any, ...]]]:
    """`(path, layer, axis names)` of each Module of `model` with an `axis_name`."""

    def is_layer(x: Any) -> bool:
        return isinstance(x, eqx.Module) and hasattr(x, "axis_name")

    out = []
    for path, node in jtu.tree_flatten_with_path(model, is_leaf=is_layer)[0]:
        if is_layer(node):
            name = jtu.keystr(path).lstrip(".") or "the model"
            out.append((name, node, _names(node.axis_name)))
    return out


def _is_bound(name: str) -> bool:
    try:
        jax.lax.axis_size(name)
    except NameError:
        return False
    return True


def check_axis_names(model: Any, error: Exception) -> None:
    """Raise a `ValueError` saying which axis names exist when `error`, raised
    while tracing `model`, comes from a layer's `axis_name`; else return.

    **Arguments:**

    - `model`: the model the step applied.
    - `error`: what applying it raised.
    """
    text = str(error)
    unbound = re.search(r"unbound axis name: ([^\s.]+)", text)
    layers = _collective_layers(model)
    if isinstance(error, NameError) and unbound:
        name = unbound.group(1)
        wrong = [x for x in layers if name in map(str, x[2])]
        problem = (
            f"collects over the axis name {name!r}, which this step does not define"
        )
    elif f"axis_name={BATCH_AXIS}" in text and "out_axes is None" in text:
        wrong = [x for x in layers if x[2] and BATCH_AXIS not in x[2]]
        if not wrong:
            return
        problem = (
            f"collects without the examples' axis {BATCH_AXIS!r}, so its "
            "statistics differ between the examples"
        )
    else:
        return
    if wrong:
        path, layer, _ = wrong[0]
        kind = type(layer).__name__
        what = f"the model's layer `{path}` ({kind}, axis_name={layer.axis_name!r})"
        if len(wrong) > 1:
            what += f" and {len(wrong) - 1} more"
    else:
        what = "a layer of the model"
    batch = (
        f"{BATCH_AXIS!r} (the examples of one device's batch, as `per_example` "
        "applies the model)"
    )
    names = (
        f"The axis names are {batch} and {DEVICE_AXIS!r} (the devices of a "
        "parallel step)."
        if _is_bound(DEVICE_AXIS)
        else f"The only axis name is {batch}: this step runs with axis_name=None, "
        f"without {DEVICE_AXIS!r}."
    )
    raise ValueError(
        f"{what} {problem}. {names} Choose "
        f"axis_name=\"{BATCH_AXIS}\" for per-device statistics (SCICO's and Flax's "
        f'behaviour) or axis_name=("{DEVICE_AXIS}", "{BATCH_AXIS}") for statistics '
        "synchronised across devices (parallel steps only)."
    ) from error

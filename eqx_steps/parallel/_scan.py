"""`steps_per_call`: several steps in one call, as a `lax.scan` over the batches.

The batch of a call then carries `steps_per_call` batches on a new leading axis;
the scan runs the per-device step once per batch, feeding the state through, and
stacks the metrics. Results equal as many single calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax
from jax.extend.core import subjaxprs

from .._validate import check_choice, check_int
from ..state import DEVICE_AXIS


Unroll = int | bool | Literal["auto"]
Carry = TypeVar("Carry")


def check_unroll(unroll: Any) -> Unroll:
    """`unroll`, checked to be `"auto"`, `True`, `False` or an int >= 1."""
    if isinstance(unroll, str):
        return check_choice("unroll", unroll, ("auto",))
    if unroll is True or unroll is False:  # the two bools `lax.scan` takes
        return unroll
    return check_int("unroll", unroll, minimum=1)


def has_primitive(jaxpr: Any, name: str) -> bool:
    """Whether `jaxpr` or a jaxpr nested in its equations uses primitive `name`."""
    return any(eqn.primitive.name == name for eqn in jaxpr.eqns) or any(
        has_primitive(sub, name) for sub in subjaxprs(jaxpr)
    )


def auto_unroll(
    step: Callable, carry: Any, batches: Any, *, platform: str, axis_size: int
) -> int | bool:
    """The unroll `"auto"` stands for: full on CPU for a step with a convolution,
    none otherwise.

    XLA:CPU runs a rolled loop over convolutions some 30x slower than the unrolled
    one, while for dense steps the rolled loop is as fast or faster and compiles
    several times quicker (docs/performance.md). Other platforms keep it rolled.
    """
    if platform != "cpu":
        return 1
    # The avals as they are (weak types included), the batch of one step.
    carry, batches = jax.tree_util.tree_map(jax.typeof, (carry, batches))
    batch = jax.tree_util.tree_map(lambda a: a.update(shape=a.shape[1:]), batches)
    jaxpr = jax.make_jaxpr(step, axis_env=[(DEVICE_AXIS, axis_size)])(carry, batch)
    return True if has_primitive(jaxpr.jaxpr, "conv_general_dilated") else 1


def repeat(
    step: Callable[[Carry, Any], tuple[Carry, Any]],
    steps_per_call: int,
    unroll: Unroll,
    *,
    platform: str,
    axis_size: int,
) -> Callable[[Carry, Any], tuple[Carry, Any]]:
    """`step` run once per batch of a stack of `steps_per_call` batches.

    **Arguments:**

    - `step`: a per-device function `(carry, batch) -> (carry, metrics)`.
    - `steps_per_call`: the number of stacked batches (1: `step` itself).
    - `unroll`: as for `jax.lax.scan`, or `"auto"` (see [`auto_unroll`][]).
    - `platform`, `axis_size`: the devices' platform and how many there are.

    **Returns:**

    A function `(carry, batches) -> (carry, stacked metrics)`.
    """
    if steps_per_call == 1:
        return step

    def steps(carry, batches):
        u = unroll
        if isinstance(u, str):
            u = auto_unroll(
                step, carry, batches, platform=platform, axis_size=axis_size
            )
        return jax.lax.scan(step, carry, batches, unroll=u)

    return steps

"""What SCICO 0.0.7's model-based networks, MoDL (`_modl.py`) and ODP (`_odp.py`),
share: the operator's checks and constant use, the measurement's shape, the
ResNet they build on, and a copy of a Module with new static fields.

Each network takes one measurement (e.g. a blurred image `(H, W, 1)` or a
sinogram `(angles, detectors, 1)`) and an `eqx.nn.State`, and returns the
reconstructed image `(H, W, channels)` and the updated state, like the other
bundled models; the library's per-example `vmap` (axis `"batch"`) makes SCICO's
batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import cast, Literal, TypeVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from ..operators import AbstractOperator
from ._convbn import ResNet


_M = TypeVar("_M", bound=eqx.Module)
ODPBlockKind = Literal["denoise", "deconv", "grad_desc"]
_ODP_BLOCKS = ("denoise", "deconv", "grad_desc")


def _check_operator(operator: object, model: str) -> AbstractOperator:
    if not isinstance(operator, AbstractOperator):
        raise TypeError(
            f"{model}: `operator` must be an eqx_steps.operators operator (e.g. "
            f"`CircularConvolve(psf, (64, 64))`), got {type(operator).__name__}; wrap "
            "a SCICO-like LinearOperator with "
            "`eqx_steps.operators.from_linear_operator`."
        )
    return operator


def _constant(operator: AbstractOperator) -> AbstractOperator:
    """The operator with its arrays (PSF, angles) cut from the derivative: they
    are data of the problem, not weights, and get zero gradients."""
    return jax.tree_util.tree_map(
        lambda leaf: lax.stop_gradient(leaf) if eqx.is_array(leaf) else leaf, operator
    )


def _measurement(op: AbstractOperator, y: Array, model: str) -> Array:
    """`y` reshaped to the operator's output shape, or a clear error."""
    if y.size != math.prod(op.output_shape):
        raise ValueError(
            f"{model}: the measurement `y` (one example of the data's 'image') has "
            f"shape {y.shape}, but the operator's `output_shape` is "
            f"{op.output_shape}: the inputs must be measurements `A x` of the "
            f"operator (per example {op.output_shape + (1,)} channels-last). Build "
            "the operator for the data's shape, or the data with this operator."
        )
    return y.reshape(op.output_shape)


def _adjoint(op: AbstractOperator, y: Array, model: str) -> Array:
    """SCICO's `atleast_3d(op.adj(y.reshape(op.output_shape)))`."""
    return jnp.atleast_3d(op.adj(_measurement(op, y, model)))


def _forward(op: AbstractOperator, x: Array) -> Array:
    """SCICO's `atleast_3d(op(x.reshape(op.input_shape)))`."""
    return jnp.atleast_3d(op(x.reshape(op.input_shape)))


def _resnet(
    block_depth: int,
    channels: int,
    num_filters: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int],
    dtype,
    bn_axis_name: Hashable | Sequence[Hashable],
    key: PRNGKeyArray,
) -> ResNet:
    # ResNet has ConvBNNet's __init__; pyright sees a dataclass one.
    make = cast(Callable[..., ResNet], ResNet)
    return make(
        block_depth,
        channels,
        num_filters,
        kernel_size,
        strides,
        dtype=dtype,
        bn_axis_name=bn_axis_name,
        key=key,
    )


def _replace_static(module: _M, **changes) -> _M:
    """A copy of `module` with some static fields changed (no `__init__` run)."""
    new = object.__new__(type(module))
    for name in module.__dataclass_fields__:  # pyright: ignore[reportAttributeAccessIssue]
        object.__setattr__(new, name, changes.get(name, getattr(module, name)))
    return new

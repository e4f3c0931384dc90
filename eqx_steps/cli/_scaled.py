"""A scaled operator, `scale * A` (SCICO's CT examples normalise the projector)."""

from __future__ import annotations

from typing import Any

import equinox as eqx
from jaxtyping import Array, Inexact

from ..operators import AbstractOperator


class ScaledOperator(AbstractOperator):
    """`scale * op`: the forward map and the adjoint of `op`, times `scale`."""

    op: AbstractOperator
    scale: float = eqx.field(static=True)
    input_shape: tuple[int, ...] = eqx.field(static=True)
    output_shape: tuple[int, ...] = eqx.field(static=True)
    input_dtype: Any = eqx.field(static=True)

    def __init__(self, op: AbstractOperator, scale: float):
        self.op = op
        self.scale = float(scale)
        self.input_shape = op.input_shape
        self.output_shape = op.output_shape
        self.input_dtype = op.input_dtype

    def __call__(self, x: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        return self.scale * self.op(x)

    def adj(self, y: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        return self.scale * self.op.adj(y)

"""Linear operators for imaging inverse problems, as Equinox Modules.

An operator is a linear map of ONE unbatched image (`input_shape` ->
`output_shape`) with an adjoint: `op(x)`, `op.adj(y)`, `op.gram(x)`. Batches go
through `jax.vmap(op)`. The operators here reproduce SCICO's numbers
(`scico.linop.CircularConvolve`, `scico.linop.XRayTransform2D`, the power
iteration and conjugate gradient of `scico.flax`); `from_linear_operator`
wraps any SCICO-like operator without importing SCICO.
"""

from ._base import (
    AbstractOperator as AbstractOperator,
    from_linear_operator as from_linear_operator,
    FunctionOperator as FunctionOperator,
)
from ._cg import cg_solve as cg_solve
from ._convolve import CircularConvolve as CircularConvolve
from ._norm import operator_norm as operator_norm, power_iteration as power_iteration
from ._xray import XRayTransform2D as XRayTransform2D

"""SCICO 0.0.7's ODP network in Equinox (helpers shared with MoDL: `_inverse.py`)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._validate import check_choice, check_int, check_number
from ..operators import AbstractOperator, operator_norm
from ._convbn import ResNet
from ._inverse import (
    _adjoint,
    _check_operator,
    _constant,
    _forward,
    _measurement,
    _ODP_BLOCKS,
    _resnet,
    ODPBlockKind,
)


class ODPBlock(eqx.Module):
    """One block of SCICO's ODP network: a ResNet and a weight `alpha` (`(1,)`).

    `kind` is SCICO's block: `"denoise"` (`ODPProxDnBlock`: `x <- (D(x) + alpha
    y) / (1 + alpha)`), `"deconv"` (`ODPProxDcnvBlock`: `x <- (alpha A^T y +
    D(x)) * (alpha * opnorm**2 + 1)`, see `ODPNet`), or `"grad_desc"`
    (`ODPGrDescBlock`: `x <- D(x) - alpha A^T (A x - y)`).
    """

    resnet: ResNet
    alpha: Float[Array, 1]
    kind: str = eqx.field(static=True)

    def __init__(self, resnet: ResNet, alpha_ini: float, kind: ODPBlockKind):
        """**Arguments:**

        - `resnet`: the block's ResNet.
        - `alpha_ini`: the initial value of `alpha`.
        - `kind`: `"denoise"`, `"deconv"` or `"grad_desc"`.
        """
        self.resnet = resnet
        self.alpha = jnp.full((1,), alpha_ini, resnet.conv_end.weight.dtype)
        self.kind = check_choice("block", kind, _ODP_BLOCKS)

    def __call__(
        self,
        x: Float[Array, "height width channels"],
        y: Float[Array, "*measurement"],
        op: AbstractOperator,
        opnorm: float | None,
        state: eqx.nn.State,
    ) -> tuple[Float[Array, "height width channels"], eqx.nn.State]:
        """**Arguments:**

        - `x`: the current reconstruction `(H, W, channels)`.
        - `y`: the measurement.
        - `op`: the operator.
        - `opnorm`: SCICO's estimate of `||A||` (used by `"deconv"` only).
        - `state`: the model state.

        **Returns:**

        The next reconstruction and the updated state.
        """
        alpha = self.alpha
        d, state = self.resnet(x, state)
        if self.kind == "denoise":
            if y.shape != x.shape:
                raise ValueError(
                    f"ODPNet(block='denoise'): the measurement `y` has shape {y.shape} "
                    f"but the image {x.shape}; the denoising block needs an operator "
                    "whose output is the image (an identity)."
                )
            return (d + y * alpha) / (1.0 + alpha), state
        if self.kind == "deconv":
            assert opnorm is not None
            scale = 1.0 / (alpha * jnp.asarray(opnorm, alpha.dtype) ** 2 + 1)
            z = alpha * _adjoint(op, y, "ODPNet") + d
            spatial = z.shape[:2]
            x = jnp.fft.irfftn(
                jnp.fft.rfftn(z, s=spatial, axes=(0, 1)) / scale,
                s=spatial,
                axes=(0, 1),
            )
            return x, state
        residual = _forward(op, x) - jnp.atleast_3d(_measurement(op, y, "ODPNet"))
        return d - alpha * _adjoint(op, residual, "ODPNet"), state


class ODPNet(eqx.Module):
    """Unrolled optimisation with deep priors (ODP), as SCICO 0.0.7's
    `scico.flax.ODPNet`.

    Starting at `x = A^T y`, `depth` blocks ([`ODPBlock`][eqx_steps.models.ODPBlock]),
    each with its own ResNet and weight `alpha`, refine the reconstruction:
    `block="denoise"` (SCICO's `ODPProxDnBlock`, for an identity operator),
    `"deconv"` (`ODPProxDcnvBlock`, for a circular convolution) or
    `"grad_desc"` (`ODPGrDescBlock`, any operator, e.g. CT).

    SCICO's behaviour, reproduced:

    - The blocks' `alpha` start at `alpha_ini`, `alpha_ini / 2`, `alpha_ini / 4`,
      ... (SCICO halves the initial value from block to block).
    - The `"deconv"` block computes `scale = 1 / (alpha * opnorm**2 + 1)`, a
      scalar, and DIVIDES the Fourier transform of `alpha A^T y + D(x)` by it,
      i.e. multiplies the block's input by `alpha * opnorm**2 + 1` (whatever
      its docstring suggests); the FFT round trip is kept, so the numbers are
      SCICO's. `opnorm` is SCICO's power-iteration ESTIMATE of `||A||`
      ([`eqx_steps.operators.operator_norm`][]: `opnorm**2 = 0.996...` for a
      blur whose exact norm is 1), computed once here at construction (SCICO
      recomputes it at every call) and kept as `operator_norm` (`None` for the
      other blocks).
    - `alpha` of each block has shape `(1,)`; `construct_traversal("alpha")`
      selects exactly these, for `clip_positive` in `train_step_post`.

    The operator's arrays are constants (their gradients are stopped), as in
    `MoDLNet`.
    """

    operator: AbstractOperator
    blocks: tuple[ODPBlock, ...]
    depth: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    block: str = eqx.field(static=True)
    operator_norm: float | None = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractOperator,
        depth: int,
        channels: int,
        num_filters: int,
        block_depth: int,
        block: ODPBlockKind = "denoise",
        alpha_ini: float = 0.5,
        kernel_size: int | Sequence[int] = (3, 3),
        strides: int | Sequence[int] = (1, 1),
        dtype=None,
        *,
        bn_axis_name: Hashable | Sequence[Hashable] = "batch",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `operator`: the forward operator `A` (an [`eqx_steps.operators`][]
            operator) on one image of `operator.input_shape`.
        - `depth`: the number of blocks (at least 1).
        - `channels`: the number of image channels.
        - `num_filters`: the number of filters of the ResNets' hidden layers.
        - `block_depth`: the number of convolution layers of each ResNet.
        - `block`: `"denoise"`, `"deconv"` or `"grad_desc"` (SCICO's
            `odp_block`: `ODPProxDnBlock`, `ODPProxDcnvBlock`, `ODPGrDescBlock`).
        - `alpha_ini`: the initial `alpha` of the first block (SCICO: 0.5).
        - `kernel_size`, `strides`: of the ResNets' convolutions.
        - `dtype`: the dtype of the parameters (default `float32`).
        - `bn_axis_name`: the batch norms' named axis (or axes).
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)

        **Raises:**

        `ValueError` for a `depth` or `block_depth` below 1 or an unknown
        `block`; `TypeError` for an operator that is not one.
        """
        self.operator = _check_operator(operator, "ODPNet")
        self.depth = check_int("depth", depth)
        self.channels = check_int("channels", channels)
        self.block = check_choice("block", block, _ODP_BLOCKS)
        alpha = check_number("alpha_ini", alpha_ini)
        block_depth = check_int("block_depth", block_depth)
        keys = jax.random.split(key, self.depth)
        blocks = []
        for i in range(self.depth):
            resnet = _resnet(
                block_depth,
                self.channels,
                num_filters,
                kernel_size,
                strides,
                dtype,
                bn_axis_name,
                keys[i],
            )
            blocks.append(ODPBlock(resnet, alpha, block))
            alpha /= 2.0
        self.blocks = tuple(blocks)
        self.operator_norm = (
            operator_norm(self.operator) if self.block == "deconv" else None
        )

    def __call__(
        self,
        y: Float[Array, "*measurement"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "height width channels"], eqx.nn.State]:
        """**Arguments:**

        - `y`: one measurement, of `operator.output_shape` elements (e.g.
            `(H, W, 1)` for a blurred image).
        - `state`: the `eqx.nn.State` with the batch-norm statistics.
        - `key`: ignored (the model is deterministic).

        **Returns:**

        The reconstruction `(H, W, channels)` and the updated state.
        """
        del key
        op = _constant(self.operator)
        x = _adjoint(op, y, "ODPNet")
        for block in self.blocks:
            x, state = block(x, y, op, self.operator_norm, state)
        return x, state

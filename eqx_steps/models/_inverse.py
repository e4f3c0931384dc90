"""SCICO 0.0.7's model-based networks, MoDL and ODP, in Equinox.

Each takes one measurement (e.g. a blurred image `(H, W, 1)` or a sinogram
`(angles, detectors, 1)`) and an `eqx.nn.State`, and returns the reconstructed
image `(H, W, channels)` and the updated state, like the other bundled models;
the library's per-example `vmap` (axis `"batch"`) makes SCICO's batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import cast, Literal, TypeVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._validate import check_choice, check_int, check_number
from ..operators import AbstractOperator, cg_solve, operator_norm
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


class MoDLNet(eqx.Module):
    """Model-based deep learning (MoDL), as SCICO 0.0.7's `scico.flax.MoDLNet`.

    From a measurement `y = A x + noise`, starting at `x = A^T y`, each of the
    `depth` iterations applies the ResNet denoiser `z = D(x)` and solves
    `(A^T A + lmbda I) x = A^T y + lmbda z` by `cg_iter` iterations of the
    conjugate gradient (SCICO's solver: unpreconditioned, from zero, a fixed
    number of iterations, differentiated through every iteration; see
    [`eqx_steps.operators.cg_solve`][]).

    SCICO's behaviour, reproduced:

    - ONE ResNet (weights shared) is applied `depth` times, so in training its
      batch-norm statistics are updated `depth` times per step (its running
      averages move `depth` times per step, as in SCICO).
    - The regularisation weight `lmbda` is one trainable value, of shape `(1,)`,
      starting at `lmbda_ini`; keep it positive as SCICO's examples do, with
      `partial(clip_positive, traversal=construct_traversal("lmbda"),
      minval=5e-4)` in `train_step_post`'s `post_lst`.
    - SCICO's two-stage recipe (train at `depth=1`, then continue deeper with
      another `cg_iter`) is [`with_depth`][eqx_steps.models.MoDLNet.with_depth].

    One difference: a measurement whose CG right-hand side is exactly zero gives
    0, where SCICO's CG divides 0 by 0 (NaN).

    The operator's arrays (the PSF, the angles) are constants: the network stops
    their gradients, so optimisers without weight decay never change them
    (exclude them with `trainable=` if you use weight decay).
    """

    operator: AbstractOperator
    resnet: ResNet
    lmbda: Float[Array, 1]
    depth: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    cg_iter: int = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractOperator,
        depth: int,
        channels: int,
        num_filters: int,
        block_depth: int,
        cg_iter: int,
        lmbda_ini: float = 0.5,
        kernel_size: int | Sequence[int] = (3, 3),
        strides: int | Sequence[int] = (1, 1),
        dtype=None,
        *,
        bn_axis_name: Hashable | Sequence[Hashable] = "batch",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `operator`: the forward operator `A` (an [`eqx_steps.operators`][]
            operator) on one image of `operator.input_shape` (e.g. `(H, W)` for
            one channel).
        - `depth`: the number of MoDL iterations (at least 1).
        - `channels`: the number of image channels.
        - `num_filters`: the number of filters of the ResNet's hidden layers.
        - `block_depth`: the number of convolution layers of the ResNet.
        - `cg_iter`: the number of conjugate-gradient iterations per solve.
        - `lmbda_ini`: the initial regularisation weight (SCICO: 0.5).
        - `kernel_size`, `strides`: of the ResNet's convolutions.
        - `dtype`: the dtype of the parameters (default `float32`).
        - `bn_axis_name`: the batch norms' named axis (or axes), `"batch"` for
            per-device statistics as SCICO, `("device", "batch")` across devices.
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)

        **Raises:**

        `ValueError` for a `depth`, `block_depth`, `cg_iter` below 1 (`cg_iter`
        below 0); `TypeError` for an operator that is not one.
        """
        self.operator = _check_operator(operator, "MoDLNet")
        self.depth = check_int("depth", depth)
        self.channels = check_int("channels", channels)
        self.cg_iter = check_int("cg_iter", cg_iter, minimum=0)
        lmbda_ini = check_number("lmbda_ini", lmbda_ini)
        block_depth = check_int("block_depth", block_depth)
        self.resnet = _resnet(
            block_depth,
            self.channels,
            num_filters,
            kernel_size,
            strides,
            dtype,
            bn_axis_name,
            key,
        )
        dtype = self.resnet.conv_end.weight.dtype
        self.lmbda = jnp.full((1,), lmbda_ini, dtype)

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
        lmbda = self.lmbda
        ahb = _adjoint(op, y, "MoDLNet")

        def normal(v):
            return op.adj(op(v)) + lmbda * v

        x = ahb
        for _ in range(self.depth):
            z, state = self.resnet(x, state)
            b = ahb + lmbda * z
            x = jnp.atleast_3d(
                cg_solve(normal, b.reshape(op.input_shape), maxiter=self.cg_iter)
            )
        return x, state

    def with_depth(self, depth: int, cg_iter: int | None = None) -> MoDLNet:
        """The same network (same ResNet weights and `lmbda`) with another depth.

        SCICO's two-stage MoDL recipe trains at `depth=1` first and then
        continues at the full depth (often with another `cg_iter`), starting
        from the weights of the first stage; the parameters do not depend on the
        depth, so they carry over unchanged, and so does the model state.

        !!! example

            ```python
            model, state = eqx.nn.make_with_state(MoDLNet)(op, 1, 1, 64, 4, 3, key=k)
            ...  # train stage 1
            deep = trained_model.with_depth(8, cg_iter=10)  # then train stage 2
            ```

        **Arguments:**

        - `depth`: the new number of MoDL iterations (at least 1).
        - `cg_iter`: the new number of CG iterations (default: unchanged).

        **Returns:**

        A new `MoDLNet` sharing this one's arrays.
        """
        depth = check_int("depth", depth)
        cg_iter = (
            self.cg_iter
            if cg_iter is None
            else check_int("cg_iter", cg_iter, minimum=0)
        )
        return _replace_static(self, depth=depth, cg_iter=cg_iter)


def _replace_static(module: _M, **changes) -> _M:
    """A copy of `module` with some static fields changed (no `__init__` run)."""
    new = object.__new__(type(module))
    for name in module.__dataclass_fields__:  # pyright: ignore[reportAttributeAccessIssue]
        object.__setattr__(new, name, changes.get(name, getattr(module, name)))
    return new


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

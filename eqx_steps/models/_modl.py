"""SCICO 0.0.7's MoDL network in Equinox (helpers shared with ODP: `_inverse.py`)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._validate import check_int, check_number
from ..operators import AbstractOperator, cg_solve
from ._convbn import ResNet
from ._inverse import _adjoint, _check_operator, _constant, _replace_static, _resnet


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

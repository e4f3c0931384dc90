"""A parallel-beam 2-D X-ray transform in pure JAX (SCICO's `XRayTransform2D`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._validate import check_int, check_number, is_real
from ._base import _check_input, AbstractOperator, check_shape


def _weights(
    x0: tuple[float, float],
    dx: tuple[float, float],
    nx: tuple[int, int],
    angle: Float[Array, ""],
    y0: float,
) -> tuple[Int[Array, "m n"], Float[Array, "m n"]]:
    """For one angle: the detector bin of each pixel and the fraction of the
    pixel falling in it (the rest falls in the next bin). SCICO's formula."""
    u = [jnp.cos(angle), jnp.sin(angle)]
    px0 = x0[0] * u[0] + x0[1] * u[1] - y0
    pdx = [dx[0] * u[0], dx[1] * u[1]]
    pxmin = jnp.min(jnp.array([px0, px0 + pdx[0], px0 + pdx[1], px0 + pdx[0] + pdx[1]]))
    px = (
        pxmin
        + pdx[0] * jnp.arange(nx[0]).reshape(-1, 1)
        + pdx[1] * jnp.arange(nx[1]).reshape(1, -1)
    )
    inds = jnp.floor(px).astype(int)
    pdx_ = jnp.array(u) * jnp.array(dx)
    diag1 = jnp.abs(pdx_[0] + pdx_[1])
    diag2 = jnp.abs(pdx_[0] - pdx_[1])
    w = jnp.max(jnp.array([diag1, diag2]))
    f = jnp.min(jnp.array([diag1, diag2]))
    width = (w + f) / 2
    distance_to_next = 1 - (px - inds)  # in (0, 1]
    weights = jnp.minimum(distance_to_next, width) / width
    return inds, weights


class XRayTransform2D(AbstractOperator):
    """Parallel-beam 2-D X-ray transform (projector), as SCICO's
    `linop.XRayTransform2D`, in pure JAX (no external toolbox).

    Each pixel's projection onto the detector is approximated by a boxcar as
    wide as the projected pixel, so a pixel contributes to at most two detector
    bins (bins have width 1). The forward map scatters pixels into bins; the
    adjoint (back-projection) gathers them with the same weights, so it is the
    exact adjoint. Both are differentiable with respect to the image. The
    numbers are SCICO 0.0.7's (same formula, same float32 arithmetic).

    Viewing an `(M, N)` image as a matrix, an angle of 0 sums its rows, `pi/2`
    its columns. The output is the sinogram `(len(angles), det_count)`.
    """

    angles: Float[Array, " angles"]
    input_shape: tuple[int, ...] = eqx.field(static=True)
    output_shape: tuple[int, ...] = eqx.field(static=True)
    input_dtype: Any = eqx.field(static=True)
    dx: tuple[float, float] = eqx.field(static=True)
    x0: tuple[float, float] = eqx.field(static=True)
    y0: float = eqx.field(static=True)

    def __init__(
        self,
        input_shape: Sequence[int],
        angles: ArrayLike,
        det_count: int | None = None,
        dx: float | Sequence[float] | None = None,
        *,
        x0: Sequence[float] | None = None,
        y0: float | None = None,
    ):
        """**Arguments:**

        - `input_shape`: the image shape `(M, N)`.
        - `angles`: the projection angles in radians, a 1-D array.
        - `det_count`: the number of detector bins; default
            `ceil(norm(input_shape))`, the image diagonal.
        - `dx`: the pixel size (one float or one per axis) in units of the
            detector bin; default `sqrt(2) / 2`, so that a projected pixel is
            never wider than a bin.
        - `x0`: the position of the corner of pixel `[0, 0]`; default
            `-input_shape * dx / 2` (the image centred on the rotation axis).
        - `y0`: the position of the edge of the first detector bin; default
            `-det_count / 2`.

        **Raises:**

        `ValueError` for an image that is not 2-D, angles that are not a
        non-empty 1-D array of finite numbers, or a non-positive `det_count`
        or `dx`.
        """
        shape = check_shape("input_shape", input_shape)
        if len(shape) != 2:
            raise ValueError(f"`input_shape` must be 2-D (height, width), got {shape}.")
        angles_np = np.asarray(angles)
        if (
            angles_np.ndim != 1
            or angles_np.size == 0
            or angles_np.dtype.kind not in "iuf"
            or not np.all(np.isfinite(angles_np))
        ):
            raise ValueError(
                "`angles` must be a non-empty 1-D array of finite angles in radians, "
                f"got {angles!r}."
            )
        if det_count is None:
            det_count = int(np.ceil(np.linalg.norm(shape)))
        det_count = check_int("det_count", det_count)
        if dx is None:
            dx = float(np.sqrt(2) / 2)
        dx_pair = (dx, dx) if is_real(dx) else dx
        if not isinstance(dx_pair, Sequence) or len(dx_pair) != 2:
            raise ValueError(f"`dx` must be a float or a pair of floats, got {dx!r}.")
        dx_x, dx_y = (check_number("dx", d, positive=True) for d in dx_pair)
        if x0 is None:
            x0 = tuple(
                float(v) for v in -(np.array(shape) * np.array((dx_x, dx_y))) / 2
            )
        if not isinstance(x0, Sequence) or len(x0) != 2:
            raise ValueError(f"`x0` must be a pair of floats, got {x0!r}.")
        self.x0 = (check_number("x0", x0[0]), check_number("x0", x0[1]))
        self.y0 = -det_count / 2 if y0 is None else check_number("y0", y0)
        self.dx = (dx_x, dx_y)
        self.angles = jnp.asarray(angles_np, jnp.float32)
        self.input_shape = shape
        self.output_shape = (int(angles_np.size), det_count)
        self.input_dtype = np.dtype(np.float32)

    @property
    def det_count(self) -> int:
        """The number of detector bins."""
        return self.output_shape[1]

    def _all_weights(self) -> tuple[Int[Array, "a m n"], Float[Array, "a m n"]]:
        nx = (self.input_shape[0], self.input_shape[1])
        return jax.vmap(_weights, in_axes=(None, None, None, 0, None))(
            self.x0, self.dx, nx, self.angles, self.y0
        )

    def __call__(self, x: Float[Array, "m n"]) -> Float[Array, "angles det"]:
        """The projection (sinogram) of one image.

        **Arguments:**

        - `x`: one image of shape `input_shape`.

        **Returns:**

        The sinogram, of shape `(len(angles), det_count)`.
        """
        _check_input(self, "x", x, self.input_shape)
        ny = self.det_count
        inds, weights = self._all_weights()
        weights = weights.astype(x.dtype)
        rows = jnp.arange(len(self.angles)).reshape(-1, 1, 1)
        valid = jnp.where((inds >= 0) * (inds < ny), weights, 0.0)
        y = jnp.zeros(self.output_shape, dtype=x.dtype).at[rows, inds].add(x * valid)
        valid = jnp.where((inds + 1 >= 0) * (inds + 1 < ny), 1 - weights, 0.0)
        return y.at[rows, inds + 1].add(x * valid)

    def adj(self, y: Float[Array, "angles det"]) -> Float[Array, "m n"]:
        """The back-projection of one sinogram (the exact adjoint).

        **Arguments:**

        - `y`: one sinogram of shape `output_shape`.

        **Returns:**

        An image of shape `input_shape`.
        """
        _check_input(self, "y", y, self.output_shape)
        ny = self.det_count
        inds, weights = self._all_weights()
        rows = jnp.arange(len(self.angles)).reshape(-1, 1, 1)
        valid = jnp.where((inds >= 0) * (inds < ny), weights, 0.0)
        hty = jnp.sum(y[rows, inds] * valid, axis=0)
        valid = jnp.where((inds + 1 >= 0) * (inds + 1 < ny), 1 - weights, 0.0)
        hty = hty + jnp.sum(y[rows, inds + 1] * valid, axis=0)
        return hty.astype(jnp.float32)

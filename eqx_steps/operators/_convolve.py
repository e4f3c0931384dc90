"""Circular convolution by the FFT, SCICO's `CircularConvolve` convention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Inexact

from ._base import _check_input, AbstractOperator, check_shape


class CircularConvolve(AbstractOperator):
    """Circular convolution with a kernel, as SCICO's `linop.CircularConvolve`.

    `A x = ifftn(fftn(psf, s=input_shape) * fftn(x))` (the real part for real
    inputs): the kernel is zero-padded to the image size with its origin at
    `psf[0, 0]`, not centred, so a kernel of size `k` shifts the image by about
    `k // 2` pixels, exactly as SCICO's operator with its default
    `h_center=None`. The adjoint is the circular correlation
    `ifftn(conj(fftn(psf)) * fftn(y))`, given explicitly (SCICO's formula, so the
    numbers are SCICO's). The kernel is a leaf of the Module.
    """

    psf: Inexact[Array, "*dims"]
    input_shape: tuple[int, ...] = eqx.field(static=True)
    output_shape: tuple[int, ...] = eqx.field(static=True)
    input_dtype: Any = eqx.field(static=True)

    def __init__(
        self,
        psf: ArrayLike,
        input_shape: Sequence[int],
        input_dtype: Any = jnp.float32,
    ):
        """**Arguments:**

        - `psf`: the kernel, with as many axes as the image (e.g. `(5, 5)` for a
            `(64, 64)` image), no larger than the image along any axis.
        - `input_shape`: the shape of the image (e.g. `(64, 64)`).
        - `input_dtype`: the dtype of the image (default `float32`).

        **Raises:**

        `ValueError` if `psf` has another number of axes than the image or is
        larger than it.
        """
        shape = check_shape("input_shape", input_shape)
        psf = jnp.asarray(psf)
        if not jnp.issubdtype(psf.dtype, jnp.inexact):
            psf = psf.astype(jnp.float32)
        if psf.ndim != len(shape):
            raise ValueError(
                f"`psf` has shape {psf.shape} ({psf.ndim} axes), but `input_shape` = "
                f"{shape} has {len(shape)}: give one kernel with the image's axes "
                "(batch with jax.vmap)."
            )
        if any(k > n for k, n in zip(psf.shape, shape)):
            raise ValueError(
                f"`psf` of shape {psf.shape} is larger than the image "
                f"(`input_shape` = {shape}); use a kernel no larger than the image "
                "along each axis, or a larger image."
            )
        self.psf = psf
        self.input_shape = shape
        self.output_shape = shape
        self.input_dtype = np.dtype(jnp.dtype(input_dtype))

    def _psf_dft(self) -> Array:
        return jnp.fft.fftn(self.psf, s=self.input_shape)

    def _real(self) -> bool:
        return not (
            jnp.iscomplexobj(self.psf) or np.dtype(self.input_dtype).kind == "c"
        )

    def __call__(self, x: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        """**Arguments:**

        - `x`: one image of shape `input_shape`.

        **Returns:**

        The circular convolution of `x` with the kernel, of the same shape.
        """
        _check_input(self, "x", x, self.input_shape)
        hx = jnp.fft.ifftn(self._psf_dft() * jnp.fft.fftn(x.astype(self.input_dtype)))
        return hx.real if self._real() else hx

    def adj(self, y: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        """The adjoint: the circular correlation of `y` with the kernel.

        **Arguments:**

        - `y`: one image of shape `output_shape`.

        **Returns:**

        An image of shape `input_shape`.
        """
        _check_input(self, "y", y, self.output_shape)
        hy = jnp.fft.ifftn(jnp.conj(self._psf_dft()) * jnp.fft.fftn(y))
        return hy.real if self._real() else hy

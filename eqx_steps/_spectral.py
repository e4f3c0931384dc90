"""Spectral norm of a linear map: power-iteration estimate and exact value.

SCICO's `scico.flax.train.spectral.estimate_spectral_norm` and
`exact_spectral_norm`; `eqx_steps.spectral_normalization_conv` builds on them.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._validate import check_int, is_int


def check_shape(fn: str, name: str, shape: Any, *, min_len: int = 0) -> tuple[int, ...]:
    """`shape` as a tuple of positive ints, at least `min_len` of them."""
    if (
        isinstance(shape, Sequence)
        and not isinstance(shape, str)
        and len(shape) >= min_len
        and all(is_int(n) and n >= 1 for n in shape)
    ):
        return tuple(int(n) for n in shape)
    raise ValueError(
        f"{fn}: `{name}` must be a tuple of at least {min_len} positive integers, "
        f"got {shape!r}."
    )


def _l2_normalize(x: Array, eps: float) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(jnp.abs(x) ** 2) + eps)


def estimate_spectral_norm(
    f: Callable[[Array], Array],
    input_shape: Sequence[int],
    seed: int = 0,
    n_steps: int = 10,
    eps: float = 1e-12,
    *,
    dtype: Any = None,
) -> Float[Array, ""]:
    """Estimate the spectral norm of a linear map by power iteration.

    SCICO's `estimate_spectral_norm`: from a standard normal `u` (drawn with
    `jax.random.PRNGKey(seed)`), `n_steps` times set `v = f(u) / |f(u)|` and
    `u = f^T(v) / |f^T(v)|` (the adjoint by `jax.vjp`), then return
    `<v, f(u)>`. The estimate approaches the largest singular value from below
    (it never exceeds it, up to rounding); the error shrinks like
    `(sigma_2 / sigma_1) ** (2 * n_steps)`.

    Traceable: it runs as one `lax.scan`, under `jit` or `pmap`.

    **Arguments:**

    - `f`: a linear map from arrays of shape `input_shape` to arrays.
    - `input_shape`: the shape of the input of `f`.
    - `seed`: the seed of the random starting vector (default 0).
    - `n_steps`: the number of power iterations (default 10).
    - `eps`: added under the square root when normalising, to avoid dividing
        by zero (default `1e-12`).
    - `dtype`: the dtype of the starting vector; default the default float dtype.

    **Returns:**

    The estimated spectral norm, a scalar.
    """
    fn = "estimate_spectral_norm"
    if not callable(f):
        raise TypeError(f"{fn}: `f` must be a callable linear map, got {f!r}.")
    input_shape = check_shape(fn, "input_shape", input_shape)
    seed = check_int("seed", seed, minimum=0)
    n_steps = check_int("n_steps", n_steps, minimum=1)

    u0 = jax.random.normal(jax.random.PRNGKey(seed), input_shape, dtype=dtype)
    out = jax.eval_shape(f, u0)
    v0 = jnp.zeros(out.shape, out.dtype)

    def step(carry: tuple[Array, Array], _: None) -> tuple[tuple[Array, Array], None]:
        u, _v = carry
        v, f_vjp = jax.vjp(f, u)
        v = _l2_normalize(v, eps)
        (u,) = f_vjp(v)
        u = _l2_normalize(u, eps)
        return (u, v), None

    (u, v), _ = jax.lax.scan(step, (u0, v0), xs=None, length=n_steps)
    return jnp.real(jnp.vdot(v, f(u)))


def exact_spectral_norm(
    f: Callable[[Array], Array], input_shape: Sequence[int], *, dtype: Any = None
) -> Float[Array, ""]:
    """The exact spectral norm of a linear map, from its dense matrix.

    SCICO's `exact_spectral_norm`: the Jacobian of `f` at zero (`jax.jacfwd`),
    flattened to an `(output size, input size)` matrix, and its largest
    singular value. The matrix has `prod(input_shape) * output size` entries:
    for small inputs only (tests, checks of `estimate_spectral_norm`).

    **Arguments:**

    - `f`: a linear map from arrays of shape `input_shape` to arrays.
    - `input_shape`: the shape of the input of `f`.
    - `dtype`: the dtype of the input; default the default float dtype.

    **Returns:**

    The spectral norm, a scalar.
    """
    fn = "exact_spectral_norm"
    if not callable(f):
        raise TypeError(f"{fn}: `f` must be a callable linear map, got {f!r}.")
    input_shape = check_shape(fn, "input_shape", input_shape)
    x0 = jnp.zeros(input_shape, dtype)
    jac = jax.jacfwd(f)(x0)
    matrix = jnp.reshape(jac, (jac.size // x0.size, x0.size))
    return jnp.linalg.norm(matrix, ord=2)


def _circular_conv(
    x: Array, weight: Array, dilation: tuple[int, ...], groups: int
) -> Array:
    """Stride-1 convolution of `x` (C, *spatial) with circular ("wrap") padding."""
    pads = [(0, 0)]
    for k, d in zip(weight.shape[2:], dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    x = jnp.pad(x, pads, mode="wrap")
    y = jax.lax.conv_general_dilated(
        x[None],
        weight,
        window_strides=(1,) * (weight.ndim - 2),
        padding="VALID",
        rhs_dilation=dilation,
        feature_group_count=groups,
    )
    return y[0]


# Jitted so that eager calls with the same shapes reuse one compilation (under an
# outer jit or pmap it is simply inlined).
@functools.partial(
    jax.jit, static_argnames=("spatial", "dilation", "groups", "n_steps", "seed")
)
def normalise_conv_weight(
    weight: Array,
    spatial: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    n_steps: int,
    seed: int,
) -> Array:
    dtype = jnp.promote_types(weight.dtype, jnp.float32)
    w = weight.astype(dtype)

    def op(x: Array) -> Array:
        return _circular_conv(x, w, dilation, groups)

    in_channels = weight.shape[1] * groups
    sigma = estimate_spectral_norm(
        op, (in_channels, *spatial), seed=seed, n_steps=n_steps, dtype=dtype
    )
    # SCICO divides unconditionally (a zero kernel would become NaN); keep it zero.
    scale = jnp.where(sigma > 0, 1.0 / (1.02 * sigma), 1.0)
    return (w * scale).astype(weight.dtype)

"""SCICO's power-iteration estimate of the operator norm."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact, Scalar

from .._validate import check_int
from ._base import AbstractOperator


@eqx.filter_jit
def _power_iteration(
    op: AbstractOperator, maxiter: int, seed: int
) -> tuple[Scalar, Inexact[Array, "*dims"]]:
    v = jax.random.normal(
        jax.random.PRNGKey(seed), shape=op.input_shape, dtype=op.input_dtype
    )
    v = v / jnp.linalg.norm(v)
    init = (0, v, v, jnp.asarray(1.0, v.real.dtype))

    def cond_fun(val):
        return jnp.logical_and(val[0] <= maxiter, val[3] > 0.0)

    def body_fun(val):
        i, v, av, norm_av = val
        v = av / norm_av
        av = op.gram(v)
        return i + 1, v, av, jnp.linalg.norm(av)

    _, v, av, norm_av = jax.lax.while_loop(cond_fun, body_fun, init)
    safe = jnp.where(norm_av > 0.0, norm_av, 1.0)
    mu = jnp.where(norm_av > 0.0, jnp.sum(v.conj() * av) / jnp.linalg.norm(v) ** 2, 0.0)
    return mu, jnp.where(norm_av > 0.0, av / safe, av)


def power_iteration(
    op: AbstractOperator, maxiter: int = 100, seed: int = 0
) -> tuple[Scalar, Inexact[Array, "*dims"]]:
    """The largest eigenvalue of `op.gram` (`A^H A`) by power iteration, SCICO's way.

    SCICO's `scico.flax.inverse.power_iteration(A.H @ A)`, which its ODP
    deconvolution block uses: a start vector drawn from
    `jax.random.normal(jax.random.PRNGKey(seed), input_shape)`, normalised, then
    `maxiter + 1` multiplications (SCICO's loop runs while `i <= maxiter`), and
    the Rayleigh quotient of the last pair. It is an estimate: for a blur whose
    exact norm is 1 it gives about `0.996` after SCICO's 100 iterations.

    **Arguments:**

    - `op`: the operator.
    - `maxiter`: the number of iterations (SCICO: 100).
    - `seed`: the seed of the start vector (SCICO: 0).

    **Returns:**

    `(mu, v)`: the eigenvalue estimate (`operator_norm(op)**2`) and its
    eigenvector estimate.
    """
    if not isinstance(op, AbstractOperator):
        raise TypeError(
            f"`op` must be an eqx_steps.operators operator, got {type(op).__name__}; "
            "wrap a SCICO-like operator with `from_linear_operator(op)`."
        )
    maxiter = check_int("maxiter", maxiter, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    return _power_iteration(op, maxiter, seed)


def operator_norm(op: AbstractOperator, maxiter: int = 100, seed: int = 0) -> float:
    """SCICO's estimate of the operator norm `||A||`: `sqrt(power_iteration(op)[0])`.

    The value SCICO's ODP deconvolution block computes (and uses, rather than the
    exact norm), in the operator's precision.

    **Arguments:**

    - `op`: the operator.
    - `maxiter`: the number of power iterations (SCICO: 100).
    - `seed`: the seed of the start vector (SCICO: 0).

    **Returns:**

    The estimate, as a Python float (the float32 value for a float32 operator).
    """
    mu, _ = power_iteration(op, maxiter, seed)
    return float(np.asarray(jnp.sqrt(mu.real)))

"""SCICO's conjugate-gradient solver: fixed iterations, differentiable."""

from __future__ import annotations

from collections.abc import Callable

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Inexact

from .._validate import check_int


def _safe_div(num: Array, den: Array) -> Array:
    """`num / den`, or 0 where `den` is 0 (with finite derivatives there)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def cg_solve(
    A: Callable[[Array], Array],
    b: Inexact[Array, "*dims"],
    maxiter: int = 50,
    x0: Inexact[Array, "*dims"] | None = None,
) -> Inexact[Array, "*dims"]:
    """Solve `A x = b` by the conjugate gradient, as SCICO's `scico.flax.cg_solver`.

    Unpreconditioned, from `x0` (default zero), exactly `maxiter` iterations in a
    `lax.scan`, with no convergence test: automatic differentiation goes through
    every iteration, so the derivatives are those of the unconverged solve that
    SCICO trains with (an implicit-derivative solver would differ whenever CG has
    not converged). `A` must be symmetric (Hermitian) positive definite.

    One difference from SCICO: where a residual is exactly zero (a zero
    right-hand side, or a solve that converged exactly), SCICO divides 0 by 0
    and returns NaN; here the step is 0 and the solution is kept (0 for `b = 0`).
    Otherwise the arithmetic is SCICO's, operation for operation.

    **Arguments:**

    - `A`: the linear map `x -> A x`.
    - `b`: the right-hand side.
    - `maxiter`: the number of iterations (SCICO's `maxiter`, default 50).
    - `x0`: the starting point (default zeros).

    **Returns:**

    The approximate solution, of the shape of `b`.
    """
    maxiter = check_int("maxiter", maxiter, minimum=0)

    def dot(u, v):
        return u.ravel().conj().T @ v.ravel()

    def step(carry, _):
        x, r, p, num = carry
        ap = A(p)
        alpha = _safe_div(num, dot(p, ap))
        x = x + alpha * p
        r = r - alpha * ap
        num_old = num
        num = dot(r, r)
        beta = _safe_div(num, num_old)
        p = r + beta * p
        return (x, r, p, num), None

    if x0 is None:
        x0 = jnp.zeros_like(b)
    r0 = b - A(x0)
    carry = (x0, r0, r0, dot(r0, r0))
    carry, _ = lax.scan(step, carry, xs=None, length=maxiter)
    return carry[0]

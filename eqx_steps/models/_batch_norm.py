"""Batch normalisation by the batch statistics, with its own derivative.

Automatic differentiation of `(x - mean) / sqrt(var + eps) * weight + bias`
through the batch mean and variance reduces each layer's activations four times
in the backward pass (one reduction per path through the statistics and the
affine parameters, with `weight` inside each sum). The derivative only needs two
per-channel means of the cotangent `dy`:

    dx = weight / std * (dy - mean(dy) - x_hat * mean(dy * x_hat))

over the whole normalisation group (the spatial axes and the named axes), and
the same two sums give the gradients of `bias` and `weight`. [`normalise`][]
states its derivative as a JVP grouped so that, once JAX transposes it, each of
the two reductions serves both a statistic and a parameter (a JVP rather than a
VJP: a custom VJP cannot use the named `vmap` axis of the examples). On XLA:CPU a
reduction over an `(N, H, W, C)` activation costs as much as a convolution (it is
rewritten to a slow `reduce-window`), so this takes SCICO's DnCNN training step
from 28 reductions of activations to 20 (SCICO's Flax step: 26). Tests compare
the derivative with automatic differentiation of Equinox's batch norm.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float


AxisName = Hashable | Sequence[Hashable]


def batch_moments(
    x: Float[Array, "*spatial channels"], axis_name: AxisName, fast_variance: bool
) -> tuple[Float[Array, " channels"], Float[Array, " channels"]]:
    """The per-channel mean and variance of `x` over its spatial axes and the
    named axes `axis_name`: in one pass (`E[x**2] - E[x]**2`, clipped at 0) with
    `fast_variance`, in two (`E[(x - E[x])**2]`) without."""
    spatial = tuple(range(x.ndim - 1))
    if fast_variance:
        mean, mean_sq = lax.pmean(
            (jnp.mean(x, spatial), jnp.mean(x * jnp.conj(x), spatial)), axis_name
        )
        var = mean_sq - mean * jnp.conj(mean)
    else:
        mean = lax.pmean(jnp.mean(x, axis=spatial), axis_name)
        centred = x - mean
        var = lax.pmean(jnp.mean(centred * jnp.conj(centred), axis=spatial), axis_name)
    return mean, jnp.maximum(0.0, var)


def scale_shift(x, mean, var, eps, weight, bias):
    """`(x - mean) / sqrt(var + eps) * weight + bias`, as Flax computes it."""
    return (x - mean) * (lax.rsqrt(var + eps) * weight) + bias


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def normalise(
    x: Float[Array, "*spatial channels"],
    weight: Float[Array, " channels"],
    bias: Float[Array, " channels"],
    eps: float,
    axis_name: AxisName,
    fast_variance: bool,
) -> tuple[
    Float[Array, "*spatial channels"],
    Float[Array, " channels"],
    Float[Array, " channels"],
]:
    """`(x - mean) / sqrt(var + eps) * weight + bias` by the batch statistics of
    `x` (see [`batch_moments`][]), and those statistics `(mean, var)`."""
    mean, var = batch_moments(x, axis_name, fast_variance)
    return scale_shift(x, mean, var, eps, weight, bias), mean, var


@normalise.defjvp
def _normalise_jvp(eps, axis_name, fast_variance, primals, tangents):
    x, weight, bias = primals
    dx, dweight, dbias = tangents
    y, mean, var = normalise(x, weight, bias, eps, axis_name, fast_variance)
    inv_std = lax.rsqrt(var + eps)
    x_hat = (x - mean) * inv_std
    spatial = tuple(range(x.ndim - 1))

    def group_mean(t):
        return lax.pmean(jnp.mean(t, spatial), axis_name)

    scale = weight * inv_std
    mean_dx, mean_dx_x_hat = group_mean(dx), group_mean(dx * x_hat)
    # Grouped so that the transposed tangent is reduced twice, `sum(ct)` and
    # `sum(ct * x_hat)`: each reduction serves a statistic and a parameter.
    dy = (
        scale * dx
        + (dbias - scale * mean_dx)
        + x_hat * (dweight - scale * mean_dx_x_hat)
    )
    dvar = 2 * mean_dx_x_hat / inv_std  # (x - mean) = x_hat / inv_std
    return (y, mean, var), (dy, mean_dx, dvar)

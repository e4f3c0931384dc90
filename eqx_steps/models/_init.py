"""Weight initialisers: Flax's variance-scaling ones, and how a layer draws its
weight with any initialiser without a compilation per operation."""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray


Initializer = Callable[..., Array]
"""`init(key, shape, dtype) -> array`, as the initialisers of `jax.nn.initializers`."""


@functools.partial(jax.jit, static_argnums=(1, 2))
def _truncated_normal(key: PRNGKeyArray, size: int, dtype: Any, stddev: Array) -> Array:
    return jax.random.truncated_normal(key, -2, 2, (size,), dtype) * stddev


class _VarianceScaling:
    """`jax.nn.initializers.variance_scaling(scale, mode, "truncated_normal",
    in_axis=1, out_axis=0)`, number for number, for `(out, in, *kernel)` weights.

    JAX draws each element from the key and the element's index alone, so a flat
    draw of any longer length, cut and reshaped, holds the same numbers. The draw
    is made at the next power of two: one small program per size class serves
    every weight shape, where drawing at the weight's shape compiles one program
    per shape (each 0.3 s to seconds on XLA:CPU, the most of building a model).
    """

    def __init__(self, scale: float, mode: str):
        self.scale, self.mode = scale, mode

    def __call__(self, key: PRNGKeyArray, shape: Sequence[int], dtype: Any = None):
        shape = tuple(int(n) for n in shape)
        dtype = jnp.dtype(default_floating_dtype() if dtype is None else dtype)
        field = math.prod(shape[2:])
        fan_in, fan_out = shape[1] * field, shape[0] * field
        denominator = {
            "fan_in": fan_in,
            "fan_out": fan_out,
            "fan_avg": (fan_in + fan_out) / 2,
        }[self.mode]
        # As variance_scaling: the standard deviation in `dtype`, over that of the
        # standard normal truncated to (-2, 2).
        variance = jnp.array(self.scale / denominator, dtype=dtype)
        stddev = jnp.sqrt(variance) / jnp.array(0.87962566103423978, dtype)
        size = math.prod(shape)
        flat = _truncated_normal(key, 1 << max(size - 1, 0).bit_length(), dtype, stddev)
        try:  # cut on the host: slicing on the device would compile per shape again
            return jnp.asarray(np.asarray(flat)[:size].reshape(shape))
        except jax.errors.TracerArrayConversionError:  # under a trace
            return flat[:size].reshape(shape)


# Flax's initialisers, for a weight stored (out, in, kh, kw) as Equinox keeps it:
# fan_in = in * kh * kw, fan_out = out * kh * kw, as Flax computes them for its
# (kh, kw, in, out) kernels.
lecun_normal: Initializer = _VarianceScaling(1.0, "fan_in")
"""Flax's default `nn.Conv` initialiser: truncated normal, variance `1 / fan_in`."""
he_normal: Initializer = _VarianceScaling(2.0, "fan_in")
"""Flax's `kaiming_normal()`: truncated normal, variance `2 / fan_in`."""
glorot_normal: Initializer = _VarianceScaling(1.0, "fan_avg")
"""Flax's `xavier_normal()`: truncated normal, variance `2 / (fan_in + fan_out)`."""


def default_floating_dtype():
    return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


@functools.lru_cache(maxsize=64)
def _cached_jit_init(init: Initializer) -> Initializer:
    return jax.jit(init, static_argnums=(1, 2))


def _jit_init(init: Initializer) -> Initializer:
    """`init` compiled once per shape (eagerly it costs several compilations)."""
    try:
        return _cached_jit_init(init)
    except TypeError:  # unhashable initialiser
        return jax.jit(init, static_argnums=(1, 2))


def make_weight(
    init: Initializer, key: PRNGKeyArray, shape: Sequence[int], dtype: Any
) -> Array:
    """`init(key, shape, dtype)`, compiled once per size class for Flax's
    variance-scaling initialisers and once per shape for any other."""
    if isinstance(init, _VarianceScaling):
        return init(key, shape, dtype)
    return _jit_init(init)(key, shape, dtype)

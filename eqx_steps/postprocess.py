"""Post-processors of the parameters: clipping and spectral normalisation.

A post-processor is a function `model -> model` applied after the optimizer
update (SCICO's `post_lst`), e.g.

```python
post_lst = [
    functools.partial(clip_positive, traversal=construct_traversal("alpha")),
    functools.partial(
        spectral_normalization_conv,
        traversal=construct_traversal("weight"),
        xshape=(64, 64, 1),
    ),
]
```

Each is a tree map over the parameter leaves, selected by a *traversal*: a
predicate `traversal(path, leaf) -> bool` over the JAX key path of a leaf and
the leaf. They are pure and traceable (`jax.jit`, `eqx.filter_pmap`), and they
never touch static fields, non-array leaves (activation functions), integer
leaves, or `None` leaves (the steps pass the trainable partition of the model,
where the non-trainable leaves are `None`; they stay `None`).

These reproduce SCICO's `scico.flax.train.traversals` and
`scico.flax.train.spectral` on Equinox PyTrees instead of Flax parameter dicts.
"""

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree


KeyPath = tuple[Any, ...]
Traversal = Callable[[KeyPath, Any], bool]


def _key_name(key: Any) -> str:
    if isinstance(key, jtu.GetAttrKey):
        return key.name
    if isinstance(key, jtu.DictKey):
        return str(key.key)
    if isinstance(key, jtu.SequenceKey):
        return str(key.idx)
    if isinstance(key, jtu.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_to_str(path: KeyPath) -> str:
    """The name of a key path as used by `construct_traversal`.

    The names of the keys (attribute names, dict keys, sequence indices) joined
    by `/`, with a leading `/` as in Flax's `ModelParamTraversal`: the weight of
    the first layer of an `eqx.nn.MLP` is `"/layers/0/weight"`.

    **Arguments:**

    - `path`: a JAX key path, as given by `jax.tree_util.tree_map_with_path`.

    **Returns:**

    The path as a string.
    """
    return "/" + "/".join(_key_name(k) for k in path)


@dataclasses.dataclass(frozen=True)
class _NameTraversal:
    prmname: str

    def __call__(self, path: KeyPath, leaf: Any) -> bool:
        return eqx.is_inexact_array(leaf) and self.prmname in path_to_str(path)


def construct_traversal(prmname: str) -> Traversal:
    """A traversal that selects the parameters whose path contains `prmname`.

    SCICO's `construct_traversal` (Flax's
    `ModelParamTraversal(lambda path, _: prmname in path)`) for Equinox
    PyTrees: a leaf is selected when `prmname` is a substring of its path
    string (see `path_to_str`: `"/layers/0/weight"`) and it is a floating-point
    (or complex) array. So `"weight"` selects every weight, `"layers/0/"` every
    parameter of the first layer, `"/alpha"` the parameters whose name starts
    with `alpha`, and `""` every floating-point leaf.

    **Arguments:**

    - `prmname`: the substring to look for in the parameter paths.

    **Returns:**

    A predicate `traversal(path, leaf) -> bool`, for the post-processors of
    this module. (It compares and hashes by `prmname`, so rebuilding it does
    not retrace a jitted step.)
    """
    if not isinstance(prmname, str):
        raise TypeError(
            "construct_traversal: `prmname` must be a string (a part of the "
            f"parameter path, e.g. 'weight'), got {type(prmname).__name__}: "
            f"{prmname!r}."
        )
    return _NameTraversal(prmname)


def _check_traversal(fn: str, traversal: Any) -> None:
    if not callable(traversal):
        raise TypeError(
            f"{fn}: `traversal` must be a callable `(path, leaf) -> bool`, such as "
            f"`construct_traversal('weight')`, got {type(traversal).__name__}: "
            f"{traversal!r}."
        )


def _check_bound(fn: str, name: str, value: Any) -> float | None:
    """Check a clipping bound; return it as a float when it is concrete."""
    is_scalar_array = (
        isinstance(value, (jax.Array, np.ndarray, np.generic))
        and np.ndim(value) == 0
        and (
            jnp.issubdtype(value.dtype, jnp.floating)
            or jnp.issubdtype(value.dtype, jnp.integer)
        )
    )
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or is_scalar_array
    ):
        raise TypeError(
            f"{fn}: `{name}` must be a real scalar (a float or a 0-d array), got "
            f"{type(value).__name__}: {value!r}."
        )
    try:
        concrete = float(value)
    except jax.errors.ConcretizationTypeError:
        return None  # traced (under jit): cannot be checked here
    if math.isnan(concrete):
        raise ValueError(f"{fn}: `{name}` must not be NaN, got {value!r}.")
    return concrete


def _map_selected(
    fn_name: str, f: Callable[[Array], Array], model: PyTree, traversal: Traversal
) -> PyTree:
    def update(path: KeyPath, leaf: Any) -> Any:
        if not (eqx.is_inexact_array(leaf) and traversal(path, leaf)):
            return leaf
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"{fn_name}: the traversal selects the complex leaf "
                f"{path_to_str(path)!r}; clipping is defined for real leaves only, "
                "so choose a traversal that leaves it out."
            )
        return f(leaf).astype(leaf.dtype)

    return jtu.tree_map_with_path(update, model)


def clip_positive(
    model: PyTree, traversal: Traversal, minval: float | Float[Array, ""] = 1e-4
) -> PyTree:
    """Clip the selected parameters from below at `minval`.

    SCICO's `clip_positive`: `jnp.clip(x, minval)` on every leaf selected by
    `traversal`; every other leaf is returned unchanged (the same object).

    **Arguments:**

    - `model`: the model (or its trainable partition, with `None` leaves).
    - `traversal`: the selection, e.g. `construct_traversal("alpha")`; only
        floating-point array leaves are ever modified.
    - `minval`: the lower bound (default `1e-4`), a real scalar.

    **Returns:**

    The model with the selected leaves clipped, same structure and dtypes.
    """
    fn = "clip_positive"
    _check_traversal(fn, traversal)
    _check_bound(fn, "minval", minval)
    return _map_selected(fn, lambda x: jnp.maximum(x, minval), model, traversal)


def clip_range(
    model: PyTree,
    traversal: Traversal,
    minval: float | Float[Array, ""] = 1e-4,
    maxval: float | Float[Array, ""] = 1,
) -> PyTree:
    """Clip the selected parameters to `[minval, maxval]`.

    SCICO's `clip_range`: `jnp.clip(x, minval, maxval)` on every leaf selected
    by `traversal`; every other leaf is returned unchanged (the same object).

    **Arguments:**

    - `model`: the model (or its trainable partition, with `None` leaves).
    - `traversal`: the selection, e.g. `construct_traversal("alpha")`; only
        floating-point array leaves are ever modified.
    - `minval`: the lower bound (default `1e-4`), a real scalar.
    - `maxval`: the upper bound (default `1`), a real scalar `>= minval`.

    **Returns:**

    The model with the selected leaves clipped, same structure and dtypes.
    """
    fn = "clip_range"
    _check_traversal(fn, traversal)
    lo = _check_bound(fn, "minval", minval)
    hi = _check_bound(fn, "maxval", maxval)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(
            f"clip_range: `minval`={minval!r} is greater than `maxval`={maxval!r}; "
            "pass minval <= maxval."
        )
    return _map_selected(
        fn, lambda x: jnp.minimum(jnp.maximum(x, minval), maxval), model, traversal
    )


def _l2_normalize(x: Array, eps: float) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(jnp.abs(x) ** 2) + eps)


def _check_shape(
    fn: str, name: str, shape: Any, *, min_len: int = 0
) -> tuple[int, ...]:
    error = ValueError(
        f"{fn}: `{name}` must be a tuple of at least {min_len} positive integers, "
        f"got {shape!r}."
    )
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise error
    dims: list[int] = []
    for n in shape:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
            raise error
        dims.append(int(n))
    if len(dims) < min_len:
        raise error
    return tuple(dims)


def _check_int(fn: str, name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: `{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{fn}: `{name}` must be >= {minimum}, got {value!r}.")
    return int(value)


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
    input_shape = _check_shape(fn, "input_shape", input_shape)
    seed = _check_int(fn, "seed", seed, minimum=0)
    n_steps = _check_int(fn, "n_steps", n_steps, minimum=1)

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
    input_shape = _check_shape(fn, "input_shape", input_shape)
    x0 = jnp.zeros(input_shape, dtype)
    jac = jax.jacfwd(f)(x0)
    matrix = jnp.reshape(jac, (jac.size // x0.size, x0.size))
    return jnp.linalg.norm(matrix, ord=2)


_ConvLike = (eqx.nn.Conv, eqx.nn.ConvTranspose)


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


def _normalise_conv_weight(
    conv: Any, path: KeyPath, xshape: tuple[int, ...], n_steps: int, seed: int
) -> Array:
    weight = conv.weight
    n = weight.ndim - 2
    where = path_to_str(path)
    if n < 1:
        raise ValueError(
            f"spectral_normalization_conv: the convolution weight {where!r} has "
            f"shape {weight.shape}; expected (out, in, *kernel) with at least one "
            "spatial dimension."
        )
    if len(xshape) == n + 1:
        spatial = xshape[:n]
    elif len(xshape) == n + 2:
        spatial = xshape[1 : n + 1]
    else:
        raise ValueError(
            f"spectral_normalization_conv: `xshape`={xshape} does not fit the "
            f"{n}-D convolution {where!r} (weight shape {weight.shape}); pass a "
            f"channels-last example shape (*spatial, channels) of length {n + 1} "
            f"or (1, *spatial, channels) of length {n + 2}."
        )
    dilation = tuple(int(d) for d in getattr(conv, "dilation", (1,) * n))
    groups = int(getattr(conv, "groups", 1))
    return _normalise_weight(weight, spatial, dilation, groups, n_steps, seed)


# Jitted so that eager calls with the same shapes reuse one compilation (under an
# outer jit or pmap it is simply inlined).
@functools.partial(
    jax.jit, static_argnames=("spatial", "dilation", "groups", "n_steps", "seed")
)
def _normalise_weight(
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


def spectral_normalization_conv(
    model: PyTree,
    traversal: Traversal,
    xshape: Sequence[int],
    n_steps: int = 10,
    *,
    seed: int = 0,
) -> PyTree:
    """Normalise the selected convolution weights by their spectral norm.

    SCICO's `spectral_normalization_conv` for Equinox: for every `eqx.nn.Conv`
    or `eqx.nn.ConvTranspose` (any subclass, any number of spatial dimensions)
    whose `weight` is selected by `traversal`, estimate the spectral norm
    `sigma` of its convolution operator with `estimate_spectral_norm`, and
    divide the weight by `1.02 * sigma`, so that the operator's norm becomes
    about `1 / 1.02`. Like SCICO's, this is a normalisation, not a projection:
    it also scales *up* weights whose norm is below `1 / 1.02`.

    The operator is the layer's convolution (its weight, `dilation` and
    `groups`) with stride 1 and circular padding, on inputs of spatial shape
    taken from `xshape` and with the number of in-channels of the weight, as
    SCICO does (SCICO ignores the layer's stride and padding). For a
    `ConvTranspose`, which Equinox computes as a convolution with its weight,
    the same operator is used. Biases, and any selected leaf that is not the
    weight of a convolution (e.g. a `Linear` weight), are left unchanged.

    Traceable; costs one power iteration (`n_steps` convolutions and their
    transposes) per selected convolution.

    **Arguments:**

    - `model`: the model (or its trainable partition, with `None` leaves).
    - `traversal`: the selection, e.g. `construct_traversal("weight")`.
    - `xshape`: the shape of one channels-last input example, `(H, W, C)`, or
        SCICO's `(1, H, W, C)` (for an n-D convolution: length n + 1 or
        n + 2). Only the spatial sizes are used.
    - `n_steps`: the number of power iterations (default 10).
    - `seed`: the seed of the power iteration's starting vector (default 0).

    **Returns:**

    The model with the selected convolution weights normalised.
    """
    fn = "spectral_normalization_conv"
    _check_traversal(fn, traversal)
    xshape = _check_shape(fn, "xshape", xshape, min_len=2)
    n_steps = _check_int(fn, "n_steps", n_steps, minimum=1)
    seed = _check_int(fn, "seed", seed, minimum=0)

    def is_conv(x: Any) -> bool:
        return isinstance(x, _ConvLike)

    def update(path: KeyPath, node: Any) -> Any:
        if not is_conv(node):
            return node
        weight = node.weight
        weight_path = (*path, jtu.GetAttrKey("weight"))
        if not (eqx.is_inexact_array(weight) and traversal(weight_path, weight)):
            return node
        new_weight = _normalise_conv_weight(node, weight_path, xshape, n_steps, seed)
        return eqx.tree_at(lambda c: c.weight, node, new_weight)

    return jtu.tree_map_with_path(update, model, is_leaf=is_conv)

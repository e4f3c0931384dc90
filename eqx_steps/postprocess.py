"""Post-processors of the parameters: clipping and spectral normalisation.

A post-processor is a function `model -> model` applied after the optimizer
update (SCICO's `post_lst`), e.g.

```python
post_lst = [
    functools.partial(clip_positive, traversal=construct_traversal("alpha")),
    functools.partial(
        spectral_normalization_conv,
        traversal=construct_traversal("kernel"),
        xshape=(64, 64, 1),
    ),
]
```

Each is a tree map over the parameter leaves, selected by a *traversal*
(`_traversal.py`: `construct_traversal`, and the selection they share): a
predicate `traversal(path, leaf) -> bool` over the JAX key path of a leaf and
the leaf (those of `construct_traversal` also take the class of the layer
holding the leaf, `owner=`, which the post-processors pass). They are pure and
traceable (`jax.jit`, `eqx.filter_pmap`), and they never touch static fields,
non-array leaves (activation functions), integer leaves, or `None` leaves (the
steps pass the trainable partition of the model, where the non-trainable leaves
are `None`; they stay `None`). A post-processor whose traversal selects
nothing raises `ValueError` instead of silently doing nothing.

These reproduce SCICO's `scico.flax.train.traversals` and
`scico.flax.train.spectral` on Equinox PyTrees instead of Flax parameter dicts.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._spectral import (
    check_shape,
    estimate_spectral_norm as estimate_spectral_norm,
    exact_spectral_norm as exact_spectral_norm,
    normalise_conv_weight,
)
from ._traversal import (
    check_traversal,
    construct_traversal as construct_traversal,
    KeyPath,
    leaves_with_owners,
    path_to_str as path_to_str,
    selects,
    selects_nothing,
    Traversal,
)
from ._validate import check_int, is_real


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
    if not (is_real(value) or is_scalar_array):
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
    def update(path: KeyPath, leaf: Any, owner: type | None) -> Any:
        if not (eqx.is_inexact_array(leaf) and selects(traversal, path, leaf, owner)):
            return leaf
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"{fn_name}: the traversal selects the complex leaf "
                f"{path_to_str(path)!r}; clipping is defined for real leaves only, "
                "so choose a traversal that leaves it out."
            )
        return f(leaf).astype(leaf.dtype)

    entries = leaves_with_owners(model)
    if not any(
        eqx.is_inexact_array(leaf) and selects(traversal, path, leaf, owner)
        for path, leaf, owner in entries
    ):
        raise selects_nothing(fn_name, traversal, model, "leaf")
    leaves = [update(*entry) for entry in entries]
    return jtu.tree_unflatten(jtu.tree_structure(model), leaves)


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
    - `minval`: the lower bound (default `1e-4`), a real scalar `> 0`: the
        function exists to keep weights positive (SCICO's examples use `5e-4`
        for MoDL's `lmbda`, `1e-3` for ODP's `alpha`); use `clip_range` for
        other bounds.

    **Returns:**

    The model with the selected leaves clipped, same structure and dtypes.

    **Raises:**

    `ValueError` when `traversal` selects no floating-point leaf of `model` (a
    misspelt name would otherwise make the clipping silently do nothing), naming
    the traversal and some of the model's leaf paths, or when `minval` is not
    positive. Under `jit` the selection (and a traced `minval`) is checked once,
    when the step is traced (a traced `minval` cannot be checked).
    """
    fn = "clip_positive"
    check_traversal(fn, traversal)
    bound = _check_bound(fn, "minval", minval)
    if bound is not None and bound <= 0:
        raise ValueError(
            f"{fn}: `minval`={minval!r} is not positive; clip_positive keeps the "
            "selected weights above a positive floor (SCICO's examples use 5e-4 for "
            "MoDL's lmbda, 1e-3 for ODP's alpha): pass minval > 0, or use "
            "clip_range(model, traversal, minval, maxval) for other bounds."
        )
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

    **Raises:**

    `ValueError` when `traversal` selects no floating-point leaf of `model` (a
    misspelt name would otherwise make the clipping silently do nothing), naming
    the traversal and some of the model's leaf paths. Under `jit` the selection
    is checked once, when the step is traced.
    """
    fn = "clip_range"
    check_traversal(fn, traversal)
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


_ConvLike = (eqx.nn.Conv, eqx.nn.ConvTranspose)


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
    return normalise_conv_weight(weight, spatial, dilation, groups, n_steps, seed)


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
    - `traversal`: the selection, e.g. `construct_traversal("kernel")`.
    - `xshape`: the shape of one channels-last input example, `(H, W, C)`, or
        SCICO's `(1, H, W, C)` (for an n-D convolution: length n + 1 or
        n + 2). Only the spatial sizes are used.
    - `n_steps`: the number of power iterations (default 10).
    - `seed`: the seed of the power iteration's starting vector (default 0).

    **Returns:**

    The model with the selected convolution weights normalised.

    **Raises:**

    `ValueError` when `traversal` selects no convolution weight of `model`,
    naming the traversal and some of the model's leaf paths (checked once, at
    trace time, under `jit`).
    """
    fn = "spectral_normalization_conv"
    check_traversal(fn, traversal)
    xshape = check_shape(fn, "xshape", xshape, min_len=2)
    n_steps = check_int("n_steps", n_steps, minimum=1)
    seed = check_int("seed", seed, minimum=0)

    def is_conv(x: Any) -> bool:
        return isinstance(x, _ConvLike)

    n_selected = 0

    def update(path: KeyPath, node: Any) -> Any:
        nonlocal n_selected
        if not is_conv(node):
            return node
        weight = node.weight
        weight_path = (*path, jtu.GetAttrKey("weight"))
        if not (
            eqx.is_inexact_array(weight)
            and selects(traversal, weight_path, weight, type(node))
        ):
            return node
        n_selected += 1
        new_weight = _normalise_conv_weight(node, weight_path, xshape, n_steps, seed)
        return eqx.tree_at(lambda c: c.weight, node, new_weight)

    out = jtu.tree_map_with_path(update, model, is_leaf=is_conv)
    if n_selected == 0:
        raise selects_nothing(fn, traversal, model, "convolution weight")
    return out

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

Each is a tree map over the parameter leaves, selected by a *traversal*: a
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

import dataclasses
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
from ._validate import check_int, is_real


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


# SCICO's (Flax's) parameter names, as Equinox names and places them: Flax calls a
# convolution's or a dense layer's weight "kernel" and a normalisation layer's
# weight "scale"; Equinox calls both "weight".
_SCICO_NAMES: dict[str, tuple[str, tuple[type, ...] | None]] = {
    "kernel": ("weight", (eqx.nn.Conv, eqx.nn.ConvTranspose, eqx.nn.Linear)),
    "scale": (
        "weight",
        (eqx.nn.BatchNorm, eqx.nn.LayerNorm, eqx.nn.GroupNorm, eqx.nn.RMSNorm),
    ),
    "bias": ("bias", None),  # any layer's bias, as Flax's "bias"
}


@dataclasses.dataclass(frozen=True)
class _NameTraversal:
    prmname: str

    def __repr__(self) -> str:
        return f"construct_traversal({self.prmname!r})"

    def iterate(self, model: PyTree) -> list[Any]:
        """The leaves of `model` this traversal selects, in `tree_leaves` order
        (SCICO's `ModelParamTraversal.iterate`)."""
        return [leaf for _, leaf in _selected_leaves(self, model)]

    def __call__(self, path: KeyPath, leaf: Any, owner: type | None = None) -> bool:
        if not eqx.is_inexact_array(leaf):
            return False
        if self.prmname not in _SCICO_NAMES:
            return self.prmname in path_to_str(path)
        name, owners = _SCICO_NAMES[self.prmname]
        if not path or _key_name(path[-1]) != name:
            return False
        if owners is None:
            return True
        if owner is None:
            raise TypeError(
                f"construct_traversal({self.prmname!r}) selects by the layer holding "
                "a leaf; call it as `traversal(path, leaf, owner=type(layer))`, or "
                "pass it to a post-processor (clip_positive, clip_range, "
                "spectral_normalization_conv), which does."
            )
        return issubclass(owner, owners)


def construct_traversal(prmname: str) -> Traversal:
    """A traversal that selects parameters by SCICO's name or by a path substring.

    SCICO's `construct_traversal` (Flax's
    `ModelParamTraversal(lambda path, _: prmname in path)`) for Equinox PyTrees.
    SCICO's parameter names select what they select in SCICO's Flax models:

    - `"kernel"`: the `weight` of every convolution and linear layer
        (`eqx.nn.Conv`, `eqx.nn.ConvTranspose`, `eqx.nn.Linear` and their
        subclasses, such as the bundled models' convolutions);
    - `"scale"`: the `weight` of every normalisation layer (`eqx.nn.BatchNorm`,
        `eqx.nn.LayerNorm`, `eqx.nn.GroupNorm`, `eqx.nn.RMSNorm` and subclasses);
    - `"bias"`: every leaf named `bias`, of any layer.

    Any other `prmname` selects the leaves whose path string (see `path_to_str`:
    `"/layers/0/weight"`) contains it: `"weight"` every weight, `"layers/0/"`
    every parameter of the first layer, `"/alpha"` the parameters whose name
    starts with `alpha`, `""` every leaf. Only floating-point (or complex) array
    leaves are ever selected.

    **Arguments:**

    - `prmname`: `"kernel"`, `"scale"`, `"bias"`, or a substring of the
        parameter paths.

    **Returns:**

    A predicate `traversal(path, leaf, owner=None) -> bool`, for the
    post-processors of this module, which pass `owner`, the class of the
    `eqx.Module` holding the leaf (`"kernel"` and `"scale"` need it). It compares
    and hashes by `prmname`, so rebuilding it does not retrace a jitted step.
    `traversal.iterate(model)` lists the leaves of `model` it selects, in
    `jax.tree_util.tree_leaves` order (SCICO's `ModelParamTraversal.iterate`),
    e.g. `[w.shape for w in construct_traversal("kernel").iterate(model)]`.
    """
    if not isinstance(prmname, str):
        raise TypeError(
            "construct_traversal: `prmname` must be a string (a part of the "
            f"parameter path, e.g. 'weight'), got {type(prmname).__name__}: "
            f"{prmname!r}."
        )
    return _NameTraversal(prmname)


def _selects(traversal: Traversal, path: KeyPath, leaf: Any, owner: Any) -> bool:
    if isinstance(traversal, _NameTraversal):
        return traversal(path, leaf, owner)
    return traversal(path, leaf)


def _selected_leaves(traversal: Traversal, model: PyTree) -> list[tuple[KeyPath, Any]]:
    """The floating-point array leaves of `model` that `traversal` selects, with
    their key paths, in `tree_leaves` order."""
    return [
        (path, leaf)
        for path, leaf, owner in _leaves_with_owners(model)
        if eqx.is_inexact_array(leaf) and _selects(traversal, path, leaf, owner)
    ]


def _selects_nothing(fn: str, traversal: Any, model: PyTree, what: str) -> ValueError:
    """The error of a post-processor whose traversal selects no leaf of `model`.

    A traversal that selects nothing (a misspelt name) would make the
    post-processor silently do nothing; this names the traversal and a few of
    the model's floating-point leaf paths to choose from. The selection depends
    on the model's structure only, so under `jit` this runs once, at trace time.
    """
    paths = [
        path_to_str(path)
        for path, leaf, _ in _leaves_with_owners(model)
        if eqx.is_inexact_array(leaf)
    ]
    if paths:
        shown = ", ".join(repr(p) for p in paths[:6])
        more = f", ... ({len(paths)} in all)" if len(paths) > 6 else ""
        have = f"the model's floating-point leaves are {shown}{more}"
    else:
        have = "the model has no floating-point array leaf"
    return ValueError(
        f"{fn}: the traversal {traversal!r} selects no {what} of the model, so it "
        f"would do nothing; {have} (a step passes only the trainable leaves). "
        "Choose a traversal that selects what is meant: `construct_traversal` "
        "with 'kernel', 'scale', 'bias' or a part of one of these paths."
    )


def _leaves_with_owners(tree: PyTree) -> list[tuple[KeyPath, Any, type | None]]:
    """Each leaf of `tree` (in `tree_leaves` order) with its key path and the class
    of the innermost `eqx.Module` holding it (`None` outside any Module)."""
    out: list[tuple[KeyPath, Any, type | None]] = []

    def visit(prefix: KeyPath, node: Any, owner: type | None) -> None:
        def is_submodule(x: Any) -> bool:
            return x is not node and isinstance(x, eqx.Module)

        for path, child in jtu.tree_flatten_with_path(node, is_leaf=is_submodule)[0]:
            if is_submodule(child):
                visit((*prefix, *path), child, type(child))
            else:
                out.append(((*prefix, *path), child, owner))

    visit((), tree, type(tree) if isinstance(tree, eqx.Module) else None)
    return out


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
        if not (eqx.is_inexact_array(leaf) and _selects(traversal, path, leaf, owner)):
            return leaf
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"{fn_name}: the traversal selects the complex leaf "
                f"{path_to_str(path)!r}; clipping is defined for real leaves only, "
                "so choose a traversal that leaves it out."
            )
        return f(leaf).astype(leaf.dtype)

    entries = _leaves_with_owners(model)
    if not any(
        eqx.is_inexact_array(leaf) and _selects(traversal, path, leaf, owner)
        for path, leaf, owner in entries
    ):
        raise _selects_nothing(fn_name, traversal, model, "leaf")
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
    _check_traversal(fn, traversal)
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
    _check_traversal(fn, traversal)
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
            and _selects(traversal, weight_path, weight, type(node))
        ):
            return node
        n_selected += 1
        new_weight = _normalise_conv_weight(node, weight_path, xshape, n_steps, seed)
        return eqx.tree_at(lambda c: c.weight, node, new_weight)

    out = jtu.tree_map_with_path(update, model, is_leaf=is_conv)
    if n_selected == 0:
        raise _selects_nothing(fn, traversal, model, "convolution weight")
    return out

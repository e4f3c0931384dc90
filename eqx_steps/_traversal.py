"""Traversals: which parameter leaves a post-processor touches.

A traversal is a predicate `traversal(path, leaf) -> bool` over the JAX key path
of a leaf and the leaf; those of `construct_traversal` also take the class of
the layer holding the leaf (`owner=`), to select by SCICO's (Flax's) parameter
names. The post-processors (`postprocess.py`) select with them, and refuse a
traversal that selects nothing.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree


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
        return [leaf for _, leaf in selected_leaves(self, model)]

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


def selects(traversal: Traversal, path: KeyPath, leaf: Any, owner: Any) -> bool:
    if isinstance(traversal, _NameTraversal):
        return traversal(path, leaf, owner)
    return traversal(path, leaf)


def selected_leaves(traversal: Traversal, model: PyTree) -> list[tuple[KeyPath, Any]]:
    """The floating-point array leaves of `model` that `traversal` selects, with
    their key paths, in `tree_leaves` order."""
    return [
        (path, leaf)
        for path, leaf, owner in leaves_with_owners(model)
        if eqx.is_inexact_array(leaf) and selects(traversal, path, leaf, owner)
    ]


def selects_nothing(fn: str, traversal: Any, model: PyTree, what: str) -> ValueError:
    """The error of a post-processor whose traversal selects no leaf of `model`.

    A traversal that selects nothing (a misspelt name) would make the
    post-processor silently do nothing; this names the traversal and a few of
    the model's floating-point leaf paths to choose from. The selection depends
    on the model's structure only, so under `jit` this runs once, at trace time.
    """
    paths = [
        path_to_str(path)
        for path, leaf, _ in leaves_with_owners(model)
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


def leaves_with_owners(tree: PyTree) -> list[tuple[KeyPath, Any, type | None]]:
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


def check_traversal(fn: str, traversal: Any) -> None:
    if not callable(traversal):
        raise TypeError(
            f"{fn}: `traversal` must be a callable `(path, leaf) -> bool`, such as "
            f"`construct_traversal('weight')`, got {type(traversal).__name__}: "
            f"{traversal!r}."
        )

"""The state split into its arrays and its static rest; one compile per rest.

A compiled parallel step takes the state's arrays as one flat list (cheap to pass
and to donate) and closes over everything else: the tree structure and the
non-array leaves (the optimizer, the activation functions, the `forward`
convention, Python scalars). [`Static`][] is that rest; [`CompileCache`][] holds
one compiled function per distinct rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np


def is_dynamic(x: Any) -> bool:
    """Whether a leaf is an array the compiled step takes as an argument."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class _Array:
    def __repr__(self):
        return "<array>"


ARRAY = _Array()
"""Marks where an array goes among a [`Static`][]'s leaves."""


class _Unhashable:
    def __repr__(self):
        return "<unhashable>"


_UNHASHABLE = _Unhashable()


class Static(NamedTuple):
    """A PyTree with its arrays taken out: rebuilds it from a list of arrays."""

    treedef: Any
    leaves: tuple  # the non-array leaves, `ARRAY` where an array goes

    def build(self, dynamic: Sequence[Any]) -> Any:
        """The PyTree with `dynamic`'s arrays put back in order."""
        it = iter(dynamic)
        leaves = [next(it) if s is ARRAY else s for s in self.leaves]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def key(self) -> tuple[Any, tuple]:
        """`(hashable, rest)`: the hashable part, and the unhashable leaves that
        a cache compares by `==` (both together are the value)."""
        try:
            hash(self.leaves)
            return (self.treedef, self.leaves), ()
        except TypeError:
            marked, rest = [], []
            for x in self.leaves:
                try:
                    hash(x)
                    marked.append(x)
                except TypeError:
                    marked.append(_UNHASHABLE)
                    rest.append(x)
            return (self.treedef, tuple(marked)), tuple(rest)


def split(tree: Any) -> tuple[list[Any], Static]:
    """`(arrays, static)`: the array leaves of `tree` in order, and the rest."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic, static = [], []
    for x in leaves:  # one pass: is_dynamic once per leaf
        if is_dynamic(x):
            dynamic.append(x)
            static.append(ARRAY)
        else:
            static.append(x)
    return dynamic, Static(treedef, tuple(static))


class CompileCache:
    """One compiled function per [`Static`][], compared by value.

    Two states share a compiled function when their tree structures are equal and
    their non-array leaves are equal: hashable leaves by hash and `==` (objects
    without their own `__eq__`, such as functions, compare by identity, as
    `jax.jit`'s static arguments do); unhashable leaves (rare: an instance of a
    mutable dataclass held in a field, say) by `==` against each compiled entry of
    the same structure, so an equal copy reuses the compiled function rather than
    compiling again. The cache keeps its keys alive.
    """

    def __init__(self, compile: Callable[[Static], Callable]):
        self._compile = compile
        self._entries: dict[Any, list[tuple[tuple, Callable]]] = {}

    def __len__(self) -> int:
        return sum(map(len, self._entries.values()))

    def get(self, static: Static) -> Callable:
        """The compiled function for `static`, compiled on first use."""
        hashable, rest = static.key()
        entries = self._entries.setdefault(hashable, [])
        for other, fn in entries:
            if other == rest:
                return fn
        fn = self._compile(static)
        entries.append((rest, fn))
        return fn

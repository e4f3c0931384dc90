"""The operator interface: a linear map of ONE unbatched image, with an adjoint."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact

from .._validate import is_int


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """`shape` as a tuple of positive ints, or a `ValueError` naming `name`."""
    if is_int(shape):
        shape = (shape,)
    if not isinstance(shape, Sequence) or not all(is_int(n) and n >= 1 for n in shape):
        raise ValueError(
            f"`{name}` must be a tuple of positive ints (an image shape such as "
            f"(64, 64)), got {shape!r}."
        )
    return tuple(int(n) for n in shape)


def _check_input(op: AbstractOperator, what: str, value: Array, shape: tuple) -> None:
    if value.shape != shape:
        raise ValueError(
            f"{type(op).__name__}: `{what}` has shape {value.shape}, but the operator "
            f"takes one unbatched array of shape {shape}. Reshape it, or apply the "
            "operator to a batch with `jax.vmap(op)`."
        )


class AbstractOperator(eqx.Module):
    """A linear operator on ONE unbatched image, as an Equinox Module.

    An operator maps an array of shape `input_shape` to one of shape
    `output_shape` (`op(x)`), and has an adjoint (`op.adj(y)`) and the normal
    operator `op.gram(x) = op.adj(op(x))`. Its arrays (a PSF, the angles of a
    scan) are leaves of the PyTree, so it can be passed through `jax.jit` and
    stored in a model; its shapes are static. Batches are handled by
    `jax.vmap(op)`.

    Subclasses implement `__call__` and set `input_shape`, `output_shape` and
    `input_dtype`. The adjoint defaults to `jax.linear_transpose` of `__call__`;
    a subclass may override `adj` with an explicit adjoint (it must do so when
    `__call__` uses an operation without a transpose rule, such as
    `jax.pure_callback`).
    """

    input_shape: eqx.AbstractVar[tuple[int, ...]]
    output_shape: eqx.AbstractVar[tuple[int, ...]]
    input_dtype: eqx.AbstractVar[Any]

    @abc.abstractmethod
    def __call__(self, x: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        """**Arguments:**

        - `x`: one array of shape `input_shape`.

        **Returns:**

        `A x`, of shape `output_shape`.
        """

    def adj(self, y: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        """The adjoint `A^H y` (by default `jax.linear_transpose` of `__call__`).

        **Arguments:**

        - `y`: one array of shape `output_shape`.

        **Returns:**

        `A^H y`, of shape `input_shape`.

        **Raises:**

        `ValueError` for a `y` of another shape; `TypeError` when `__call__` has
        no transpose rule (then give the adjoint explicitly).
        """
        _check_input(self, "y", y, self.output_shape)
        primal = jax.ShapeDtypeStruct(self.input_shape, jnp.dtype(self.input_dtype))
        try:
            transpose = jax.linear_transpose(self.__call__, primal)
            (x,) = transpose(y.astype(jnp.result_type(y, self.input_dtype)))
        except (NotImplementedError, ValueError) as e:
            raise TypeError(
                f"{type(self).__name__} has no explicit adjoint and JAX cannot "
                f"transpose its forward map ({str(e).splitlines()[0]}). Give the "
                "adjoint explicitly, e.g. `FunctionOperator(fn, input_shape, "
                "output_shape, adjoint=adj_fn)` or `from_linear_operator(op)` for an "
                "object with an `adj` method."
            ) from None
        return x

    def gram(self, x: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        """The normal operator `A^H A x`.

        **Arguments:**

        - `x`: one array of shape `input_shape`.

        **Returns:**

        `A^H (A x)`, of shape `input_shape`.
        """
        return self.adj(self(x))


class _Identity:
    """A callable compared and hashed by identity, so a static field never
    compares arrays or unhashable objects (a new wrapper is a new static value)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<{getattr(self.fn, '__qualname__', type(self.fn).__name__)}>"


class FunctionOperator(AbstractOperator):
    """An operator from a function (and optionally its adjoint).

    For a forward map written as a function of one image: a JAX function (whose
    adjoint JAX derives by `jax.linear_transpose` when none is given), or a
    function built on callbacks (`jax.pure_callback`, an external toolbox), which
    has no transpose rule and needs `adjoint`. The functions are static: arrays
    they close over are constants, not leaves.
    """

    fn: Callable = eqx.field(static=True)
    adjoint: Callable | None = eqx.field(static=True)
    input_shape: tuple[int, ...] = eqx.field(static=True)
    output_shape: tuple[int, ...] = eqx.field(static=True)
    input_dtype: Any = eqx.field(static=True)

    def __init__(
        self,
        fn: Callable[[Array], Array],
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        adjoint: Callable[[Array], Array] | None = None,
        input_dtype: Any = jnp.float32,
    ):
        """**Arguments:**

        - `fn`: `fn(x) -> y`, linear, for one `x` of shape `input_shape`.
        - `input_shape`, `output_shape`: the shapes of `x` and `fn(x)`.
        - `adjoint`: `adjoint(y) -> x`, the adjoint of `fn`; by default
            `jax.linear_transpose(fn)`.
        - `input_dtype`: the dtype of `x` (default `float32`).

        **Raises:**

        `ValueError` if `fn` (or `adjoint`) does not return the declared shape.
        """
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {fn!r}.")
        if adjoint is not None and not callable(adjoint):
            raise TypeError(f"`adjoint` must be callable or None, got {adjoint!r}.")
        self.input_shape = check_shape("input_shape", input_shape)
        self.output_shape = check_shape("output_shape", output_shape)
        self.input_dtype = np.dtype(jnp.dtype(input_dtype))
        self.fn = _Identity(fn)
        self.adjoint = None if adjoint is None else _Identity(adjoint)
        x = jax.ShapeDtypeStruct(self.input_shape, self.input_dtype)
        out = jax.eval_shape(fn, x)
        if getattr(out, "shape", None) != self.output_shape:
            raise ValueError(
                f"`fn` maps an input of shape {self.input_shape} to "
                f"{getattr(out, 'shape', out)}, not to `output_shape` = "
                f"{self.output_shape}; give the shape it returns."
            )
        if adjoint is not None:
            back = jax.eval_shape(adjoint, jax.ShapeDtypeStruct(out.shape, out.dtype))
            if getattr(back, "shape", None) != self.input_shape:
                raise ValueError(
                    f"`adjoint` maps an array of shape {self.output_shape} to "
                    f"{getattr(back, 'shape', back)}, not to `input_shape` = "
                    f"{self.input_shape}."
                )

    def __call__(self, x: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        """**Arguments:**

        - `x`: one array of shape `input_shape`.

        **Returns:**

        `fn(x)`, of shape `output_shape`.
        """
        _check_input(self, "x", x, self.input_shape)
        return self.fn(x)

    def adj(self, y: Inexact[Array, "*dims"]) -> Inexact[Array, "*dims"]:
        """The adjoint: `adjoint(y)` if given, else `jax.linear_transpose(fn)`.

        **Arguments:**

        - `y`: one array of shape `output_shape`.

        **Returns:**

        An array of shape `input_shape`.
        """
        if self.adjoint is None:
            return super().adj(y)
        _check_input(self, "y", y, self.output_shape)
        return self.adjoint(y)


def from_linear_operator(op: Any) -> FunctionOperator:
    """Wrap an object that looks like a SCICO `LinearOperator` as an operator.

    Any object with `op(x)`, `op.adj(y)`, `op.input_shape` and `op.output_shape`
    (and optionally `op.input_dtype`) works, e.g. a `scico.linop` operator or an
    operator of an external CT toolbox; SCICO itself is never imported. The
    object's methods are used as they are (`op.adj` as the explicit adjoint, so
    operators built on callbacks work too).

    **Arguments:**

    - `op`: the SCICO-like linear operator.

    **Returns:**

    A [`FunctionOperator`][eqx_steps.operators.FunctionOperator] with the same
    shapes, forward map and adjoint.

    **Raises:**

    `TypeError` if `op` lacks one of the four attributes.
    """
    missing = [
        name
        for name in ("__call__", "adj", "input_shape", "output_shape")
        if not hasattr(op, name)
    ]
    if missing:
        raise TypeError(
            f"`op` = {op!r} does not look like a linear operator: it has no "
            f"{', '.join(map(repr, missing))}. Give an object with `op(x)`, "
            "`op.adj(y)`, `op.input_shape` and `op.output_shape` (as SCICO's "
            "`LinearOperator`), or build a `FunctionOperator`."
        )
    dtype = getattr(op, "input_dtype", None) or jnp.float32
    return FunctionOperator(
        lambda x: op(x),
        op.input_shape,
        op.output_shape,
        adjoint=lambda y: op.adj(y),
        input_dtype=dtype,
    )

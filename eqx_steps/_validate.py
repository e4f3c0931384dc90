"""Checks at the public boundary: one home for each kind of mistake.

Every public function validates its arguments with these, so that a bad input
gets one kind of exception with one kind of message, naming the argument, the
value and the fix:

- a value of the wrong type raises `TypeError`;
- a value of the right type but out of range (or not one of the choices, or not
  divisible as needed) raises `ValueError`.

All checks take `(name, value, ...)` in that order; `name` is how the user wrote
the argument (`"batch_size"`, `"config['batch_size']"`, `"--epochs"`).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


DATA_KEYS = ("image", "label")
"""The keys the steps read from a batch: `"image"` (input), `"label"` (target)."""


def is_integer_image(x: Any) -> bool:
    """Whether `x` is an image by the default convention, to be cast as SCICO casts.

    A single integer array (not a tuple or dict of inputs) of an unsigned dtype
    (`uint8`, `uint16`: pixel values), or of any integer dtype with at least two
    axes per example (`(H, W)` or `(H, W, C)`). Token ids, `(n, T)` of a signed
    integer dtype, are not; boolean arrays never are.
    """
    if isinstance(x, (tuple, list, Mapping)) or not hasattr(x, "dtype"):
        return False
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        return False
    return np.issubdtype(dtype, np.unsignedinteger) or np.ndim(x) >= 3


def is_int(value: Any) -> bool:
    """Whether `value` is an integer (Python or NumPy), and not a `bool`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether `value` is a real number (int or float), and not a `bool`."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _quote(name: str) -> str:
    return name if name.startswith(("-", "config[")) else f"`{name}`"


def check_int(name: str, value: Any, *, minimum: int | None = 1) -> int:
    """`value` as an `int`, checked to be an integer `>= minimum`.

    **Arguments:**

    - `name`: the argument's name, for the message.
    - `value`: the value given.
    - `minimum`: the smallest allowed value (`None`: no bound).

    **Returns:**

    `int(value)`.

    **Raises:**

    `TypeError` if `value` is not an integer (a `bool` is not), `ValueError` if
    it is below `minimum`.
    """
    if not is_int(value):
        bound = "" if minimum is None else f" >= {minimum}"
        raise TypeError(
            f"{_quote(name)} must be an int{bound}, got {value!r} "
            f"({type(value).__name__})."
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"{_quote(name)} must be an int >= {minimum}, got {value}.")
    return int(value)


def check_number(
    name: str, value: Any, *, minimum: float | None = None, positive: bool = False
) -> float:
    """`value` as a finite `float`, checked against its bounds.

    **Arguments:**

    - `name`: the argument's name, for the message.
    - `value`: the value given.
    - `minimum`: the smallest allowed value, or `None`.
    - `positive`: require `value > 0`.

    **Returns:**

    `float(value)`.

    **Raises:**

    `TypeError` if `value` is not a real number, `ValueError` if it is not
    finite or out of bounds.
    """
    if not is_real(value):
        raise TypeError(
            f"{_quote(name)} must be a number, got {value!r} ({type(value).__name__})."
        )
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{_quote(name)} must be finite, got {value!r}.")
    if positive and x <= 0:
        raise ValueError(f"{_quote(name)} must be > 0, got {value!r}.")
    if minimum is not None and x < minimum:
        raise ValueError(f"{_quote(name)} must be >= {minimum:g}, got {value!r}.")
    return x


def check_bool(name: str, value: Any) -> bool:
    """`value`, checked to be a `bool` (`TypeError` otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{_quote(name)} must be True or False, got {value!r} "
            f"({type(value).__name__})."
        )
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value`, checked to be one of `choices` (`ValueError` otherwise, naming the
    closest choice)."""
    choices = tuple(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{_quote(name)} = {value!r} is not valid; use one of "
            f"{', '.join(map(repr, choices))}{hint}."
        )
    return value


def nearest_multiples(value: int, base: int) -> str:
    """The multiples of `base` around `value`, for a message: `"8 or 12"`."""
    below = (value // base) * base
    above = below + base
    return str(above) if below == 0 else f"{below} or {above}"


def check_divisible(name: str, value: int, count: int, what: str) -> int:
    """`value`, checked to be divisible by `count` (e.g. the device count).

    **Arguments:**

    - `name`: the argument's name, for the message.
    - `value`: the value given (already checked to be an int).
    - `count`: the divisor.
    - `what`: what `count` counts, for the message (`"devices"`,
        `"local devices"`, `"processes"`).

    **Returns:**

    `value`.

    **Raises:**

    `ValueError` naming the nearest valid values.
    """
    if value % count:
        raise ValueError(
            f"{_quote(name)} = {value} is not divisible by the {count} {what}; use a "
            f"multiple of {count}, e.g. {nearest_multiples(value, count)}."
        )
    return value


def check_dataset(
    name: str, dataset: Any, keys: Iterable[str] = DATA_KEYS
) -> Mapping[str, Any]:
    """`dataset`, checked to be a mapping holding `keys` (default image and label).

    **Raises:**

    `TypeError` if it is not a mapping, `ValueError` naming the missing keys.
    """
    if not isinstance(dataset, Mapping):
        raise TypeError(
            f"{_quote(name)} must be a dict of arrays with keys "
            f"{', '.join(map(repr, keys))}, got {type(dataset).__name__}; build it "
            "as {'image': inputs, 'label': targets}."
        )
    missing = [k for k in keys if k not in dataset]
    if missing:
        raise ValueError(
            f"{_quote(name)} has keys {sorted(map(str, dataset))} but lacks "
            f"{missing}; the steps read 'image' (input) and 'label' (target): rename "
            "your keys."
        )
    return dataset


def is_grain(obj: Any) -> bool:
    """Whether `obj` is a Grain `MapDataset`, `IterDataset` or `DataLoader`.

    Decided from its class alone, without importing Grain (a program that never
    uses Grain does not load it).

    **Arguments:**

    - `obj`: anything.

    **Returns:**

    `True` for an instance of `grain.MapDataset`, `grain.IterDataset` or
    `grain.DataLoader` (or of a subclass, such as
    [`eqx_steps.pipeline.ImageFolderDataset`][]).
    """
    if getattr(type(obj), "eqx_steps_grain_input", False):
        return True
    names = {"MapDataset", "IterDataset", "DataLoader"}
    return any(
        c.__module__.split(".")[0] == "grain" and c.__name__ in names
        for c in type(obj).__mro__
    )

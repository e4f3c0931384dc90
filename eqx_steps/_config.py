"""The trainer's configuration: SCICO's keys (`ConfigDict`) and their defaults
(`TrainConfig`), validated from the dataclass's own annotations."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, TypedDict, Union

import optax

from ._validate import check_bool, check_choice, check_int, check_number
from .losses import mse_loss
from .metrics import compute_metrics
from .schedules import create_cnst_lr_schedule
from .state import create_basic_train_state
from .steps import eval_step, train_step


class ConfigDict(TypedDict, total=False):
    """SCICO's configuration keys, with their SCICO meaning.

    Every key is optional; a missing key takes its default from
    [`eqx_steps.TrainConfig`][].
    """

    seed: int
    opt_type: str
    momentum: float
    batch_size: int
    num_epochs: int
    base_learning_rate: float
    lr_decay_rate: float
    warmup_epochs: int
    steps_per_eval: int
    log_every_steps: int
    steps_per_checkpoint: int
    log: bool
    workdir: str
    checkpointing: bool
    return_state: bool
    lr_schedule: Callable
    criterion: Callable
    create_train_state: Callable
    train_step_fn: Callable
    eval_step_fn: Callable
    metrics_fn: Callable
    post_lst: list[Callable]
    backend: str
    steps_per_call: int
    nan_policy: str
    shard_optimizer_state: bool
    num_steps: int
    shuffle: bool
    input_key: str
    target_key: str


@dataclasses.dataclass(frozen=True)
class _Minimum:
    """An `Annotated` marker: the smallest value a number field accepts."""

    value: float


class _AcceptsPath:
    """An `Annotated` marker: a `str` field that also takes an `os.PathLike`,
    stored as `os.fspath(value)`."""


class _ItemError(TypeError):
    """A wrong item in a container of the right type (not another alternative)."""


_PositiveInt = Annotated[int, _Minimum(1)]
_NonNegativeInt = Annotated[int, _Minimum(0)]
_NonNegativeFloat = Annotated[float, _Minimum(0)]
_Path = Annotated[str, _AcceptsPath()]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The configuration of a training run, with SCICO's defaults.

    `None` means "derived from the data", as in SCICO: `batch_size` = 2 x the
    device count, `steps_per_eval` = a whole pass over the test set,
    `log_every_steps` = 20 epochs, `steps_per_checkpoint` = 10 epochs.

    `return_state` defaults to `True` (SCICO's default is `False`): `train()`
    returns the `TrainState`; with `False` it returns `(model, model_state)`,
    the Equinox counterpart of SCICO's `{"params", "batch_stats"}`.

    The last eight fields go beyond SCICO: `backend`, `steps_per_call`,
    `nan_policy` and `shard_optimizer_state` of
    [`eqx_steps.parallel_train_step`][]; `num_steps`, the length of the run in
    steps (when set, it replaces `num_epochs`, which then only feeds the
    schedules); `shuffle`, whether each epoch visits the training examples in a
    new random order (SCICO's, the default) or in their order; and `input_key`
    and `target_key`, the dataset entries that are the model's input and the
    target (SCICO's `"image"` and `"label"`).

    `criterion` defaults to [`eqx_steps.mse_loss`][], SCICO's **half** mean
    squared error (`0.5 * mean((y - t) ** 2)`); [`eqx_steps.mean_squared_error`][]
    is the full one a plain Equinox loop usually writes.

    The annotations are the validation: a `TrainConfig` (however made: directly,
    by [`eqx_steps.TrainConfig.from_dict`][] or `dataclasses.replace`) accepts
    for each field what its annotation says (an `int` field takes no
    `bool`, a `float` field takes an `int`, a `Literal` lists the choices, a
    lower bound is an `Annotated` marker).
    """

    seed: int = 0
    opt_type: str = "ADAM"
    momentum: float | None = None
    batch_size: _PositiveInt | None = None
    num_epochs: _PositiveInt = 10
    base_learning_rate: _NonNegativeFloat = 1e-2
    lr_decay_rate: float = 0.95
    warmup_epochs: _NonNegativeInt = 0
    steps_per_eval: _PositiveInt | None = None
    log_every_steps: _PositiveInt | None = None
    steps_per_checkpoint: _PositiveInt | None = None
    log: bool = False
    workdir: _Path = "./"
    checkpointing: bool = False
    return_state: bool = True
    lr_schedule: Callable[[Mapping[str, Any]], optax.ScalarOrSchedule] = (
        create_cnst_lr_schedule
    )
    criterion: Callable = mse_loss
    create_train_state: Callable = create_basic_train_state
    train_step_fn: Callable = train_step
    eval_step_fn: Callable = eval_step
    metrics_fn: Callable = compute_metrics
    post_lst: tuple[Callable, ...] | None = None
    backend: Literal["pmap", "sharded"] = "pmap"
    steps_per_call: _PositiveInt = 1
    nan_policy: Literal["raise", "skip", "ignore"] = "raise"
    shard_optimizer_state: bool = False
    num_steps: _PositiveInt | None = None
    shuffle: bool = True
    input_key: str = "image"
    target_key: str = "label"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | TrainConfig) -> TrainConfig:
        """Validate a SCICO-style dict into a `TrainConfig`.

        **Arguments:**

        - `config`: a mapping of [`eqx_steps.ConfigDict`][] keys (or a
            `TrainConfig`, returned as it is).

        **Returns:**

        The `TrainConfig`; missing keys take their defaults, a path for
        `workdir` becomes a `str` and a list for `post_lst` a tuple.

        **Raises:**

        `ValueError` for an unknown key (naming the closest valid one) or a value
        out of range, and `TypeError` for a value of the wrong type (naming the
        key).
        """
        if isinstance(config, TrainConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(
                "`config` must be a dict or a TrainConfig, got "
                f"{type(config).__name__}."
            )
        names = _field_types(cls)
        for key in config:
            if key not in names and key != "steps_per_epoch":
                close = difflib.get_close_matches(str(key), list(names), n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "valid keys are " + ", ".join(names)
                )
                raise ValueError(f"unknown config key {key!r}: {hint}")
        # SCICO writes the derived `steps_per_epoch` back into its config.
        return cls(**{k: v for k, v in config.items() if k != "steps_per_epoch"})

    def __post_init__(self):
        for name, hint in _field_types(type(self)).items():
            value = _convert(f"config[{name!r}]", hint, getattr(self, name))
            object.__setattr__(self, name, value)  # frozen: set once, here

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (callables included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(hint: Any) -> str:
    """How an annotation reads in a message: `int`, `None`, `a function`, ..."""
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "None"
    if origin is Annotated:
        base, *marks = typing.get_args(hint)
        path = any(isinstance(m, _AcceptsPath) for m in marks)
        return _describe(base) + (" or os.PathLike" if path else "")
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if origin is tuple:
        return "a list of functions"
    if hint is Callable or origin is Callable:
        return "a function"
    return getattr(origin or hint, "__name__", str(hint))


def _convert(name: str, hint: Any, value: Any) -> Any:
    """`value` checked against the annotation `hint` (and converted, see
    `TrainConfig.from_dict`); `name` is how the message names it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *marks = args
        if isinstance(value, os.PathLike) and any(
            isinstance(m, _AcceptsPath) for m in marks
        ):
            value = os.fspath(value)
        minimum = next((m.value for m in marks if isinstance(m, _Minimum)), None)
        if base is int:
            return check_int(name, value, minimum=int(minimum or 0))
        if base is float:
            return check_number(name, value, minimum=minimum)
        if not isinstance(value, base):
            raise _wrong_type(name, hint, value)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alternative in (a for a in args if a is not type(None)):
            try:
                return _convert(name, alternative, value)
            except _ItemError:
                raise
            except TypeError:
                continue
        raise _wrong_type(name, hint, value)
    if origin is Literal:
        return check_choice(name, value, args)
    if hint is bool:
        return check_bool(name, value)
    if hint is int:
        return check_int(name, value, minimum=None)
    if hint is float:
        return check_number(name, value)
    if origin is tuple and isinstance(value, (list, tuple)):
        try:
            return tuple(
                _convert(f"{name}[{i}]", args[0], v) for i, v in enumerate(value)
            )
        except TypeError as e:
            raise _ItemError(str(e)) from None
    if hint is Callable or origin is Callable:
        if callable(value):
            return value
    elif isinstance(value, hint if origin is None else origin):
        return value
    raise _wrong_type(name, hint, value)


def _wrong_type(name: str, hint: Any, value: Any) -> TypeError:
    return TypeError(
        f"{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})."
    )

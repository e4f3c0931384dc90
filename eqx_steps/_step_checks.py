"""What the steps check at their boundary, and how they call the user's code.

The batch, the functions and post-processors given to a step builder, the
model's call signature (the key convention), dtypes and the input layout the
stock `forward`s unpack; then the model and the criterion themselves, called so
that a failure while tracing names the batch, the missing key or the reversed
arguments. Everything here runs when a step is built or traced, never per call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._axis_check import check_axis_names
from ._forward import (
    _describe,
    check_inputs_layout,
    per_example,
    per_example_args,
    per_example_kwargs,
    whole_batch,
)
from ._model_checks import check_model_state, ModelStateError
from ._validate import is_integer_image
from .state import TrainState


if TYPE_CHECKING:
    from .steps import Batch, PostFn


def check_step_batch(batch: Any, argname: str = "batch") -> None:
    """Raise a clear error unless `batch` is a mapping with "image" and "label"."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"`{argname}` must be a dict with keys 'image' and 'label', got "
            f"{type(batch).__name__}; build batches as "
            "{'image': inputs, 'label': targets}."
        )
    missing = [k for k in ("image", "label") if k not in batch]
    if missing:
        raise ValueError(
            f"`{argname}` has keys {sorted(batch)} but lacks {missing}; the steps read "
            "batch['image'] (input) and batch['label'] (target): rename your keys."
        )


def check_callables(**functions: Any) -> None:
    """Raise `TypeError` naming the first of `functions` that is not callable."""
    for name, fn in functions.items():
        if not callable(fn):
            raise TypeError(
                f"`{name}` must be a function, got {type(fn).__name__}: {fn!r}; pass "
                "the function itself (e.g. eqx_steps.mse_loss, "
                "eqx_steps.compute_metrics, eqx_steps.train_step)."
            )


def check_post_lst(post_lst: Any) -> tuple[PostFn, ...]:
    """`post_lst` as a tuple, checked to be a sequence of callables."""
    if post_lst is None:
        return ()
    if not isinstance(post_lst, Sequence) or isinstance(post_lst, str):
        raise TypeError(
            f"`post_lst` must be a list of functions model -> model, got "
            f"{type(post_lst).__name__}: {post_lst!r}; pass e.g. "
            "[functools.partial(eqx_steps.clip_positive, traversal=...)]."
        )
    for i, post in enumerate(post_lst):
        if not callable(post):
            raise TypeError(
                f"`post_lst[{i}]` must be a function model -> model, got "
                f"{type(post).__name__}: {post!r}; pass the function itself, e.g. "
                "functools.partial(eqx_steps.clip_positive, traversal=...)."
            )
    return tuple(post_lst)


def _model_dtypes(model: PyTree) -> set[Any]:
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    return {jnp.dtype(x.dtype) for x in leaves}


STOCK_FORWARDS = (per_example, whole_batch, per_example_args, per_example_kwargs)


def model_label(model: Any) -> str:
    return getattr(model, "__name__", None) or type(model).__name__


def _signature(model: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(model)
    except (TypeError, ValueError):
        return None


def check_key_convention(model: Any, key: Any, *, training: bool) -> None:
    """Raise a `TypeError` naming the fix when the model's call signature does
    not fit how the stock `forward`s pass `key` (only when a key is given, and
    never at evaluation)."""
    sig = _signature(model)
    if sig is None:
        return
    params = sig.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    param = params.get("key")
    call = f"`{model_label(model)}.__call__{sig}`"
    if param is not None and param.kind not in (param.VAR_POSITIONAL,):
        if param.default is param.empty:
            raise TypeError(
                f"{call} requires `key`, but evaluation (and a state without a key) "
                "calls the model without one: `__call__` must accept `key=None` "
                "(e.g. `def __call__(self, x, *, key=None)`, as Equinox's layers "
                "do), and use the key only when it is given."
            )
        return
    if training and key is not None and not takes_any:
        raise TypeError(
            f"the state holds a PRNG key (TrainState.create(..., key=...), "
            f"BasicTrainer(..., key=...)), so the steps call the model with `key=`, "
            f"but {call} takes no `key`: do not pass `key` (leave it None) for a "
            "model without random layers, or give `__call__` a `key=None` "
            "parameter and hand it to its Dropout layers."
        )


def check_inputs(state: TrainState, batch: Batch, *, training: bool = True) -> None:
    """Check what the stock `forward`s hand the model, before it is traced.

    With a stock `forward` ([`eqx_steps.per_example`][],
    [`eqx_steps.per_example_args`][], [`eqx_steps.per_example_kwargs`][],
    [`eqx_steps.whole_batch`][]; a custom `forward` may convert its inputs
    itself): the model is callable, its `model_state` belongs to it, its call
    signature fits the key convention, the input has the layout the `forward`
    unpacks, and every floating leaf of `batch["image"]` has the model's
    floating dtype when all of its floating leaves share one (XLA's convolutions
    refuse mixed dtypes). Integer and boolean leaves (token ids, masks) are
    passed as they are. Runs when a step is traced, so it costs nothing per call.
    """
    if state.forward not in STOCK_FORWARDS:
        return
    if not callable(state.model):
        raise TypeError(
            f"`state.model` must be callable (an Equinox module with `__call__`), "
            f"got {type(state.model).__name__}; pass the model itself to "
            "TrainState.create (not, e.g., its parameters), or a `forward` that "
            "knows how to apply it."
        )
    check_model_state(state.model, state.model_state, "state.model_state")
    check_key_convention(state.model, state.key, training=training)
    check_inputs_layout(state.forward, batch["image"], "batch['image']")
    dtypes = _model_dtypes(state.model)
    image = batch["image"]
    if state.forward in (per_example, whole_batch) and is_integer_image(image):
        want = next(iter(dtypes)) if len(dtypes) == 1 else jnp.dtype(jnp.float32)
        raise ValueError(
            f"`batch['image']` has dtype {jnp.result_type(image)}: integer images "
            f"(pixel values), but the model takes floating-point inputs; cast the "
            f"images first, e.g. `images.astype(jnp.{want})` (create_input_iter, "
            "and so BasicTrainer, casts integer images as SCICO does). Integer "
            "inputs that are not images (token ids: a signed integer array of "
            "shape (n, T)) are passed as they are."
        )
    for path, x in jax.tree_util.tree_flatten_with_path(image)[0]:
        dtype = jnp.result_type(x)
        name = f"batch['image']{jax.tree_util.keystr(path)}"
        if not jnp.issubdtype(dtype, jnp.inexact):
            continue  # token ids, class indices, masks: the model's business
        if len(dtypes) == 1 and dtype not in dtypes:
            want = next(iter(dtypes))
            raise ValueError(
                f"`{name}` has dtype {dtype}, but the model's floating-point leaves "
                f"are {want}; cast the images with `images.astype(jnp.{want})`, or "
                f"build the model in {dtype} (with x64 on, Equinox layers default to "
                "float64)."
            )


def apply_forward(
    state: TrainState, model: PyTree, x: PyTree, **kwargs: Any
) -> tuple[PyTree, eqx.nn.State | None]:
    """`state.forward(model, state.model_state, x, **kwargs)`, naming the batch when
    the model cannot take it (an error raised while tracing the model, e.g. a
    shape mismatch inside a layer), and the state's key when a random layer
    needs one. Runs when a step is traced: no cost per call.
    """
    try:
        return state.forward(model, state.model_state, x, **kwargs)
    except ModelStateError:
        raise
    except NameError as e:  # a layer's collective over an axis no step binds
        check_axis_names(model, e)
        raise
    except RuntimeError as e:
        if "requires a key" not in str(e):
            raise
        raise RuntimeError(
            f"a random layer of the model needs a key in training ({e}); the steps "
            "pass one only when the state holds a PRNG key: create the state with "
            "`TrainState.create(model, tx, key=jax.random.key(0))` (or "
            "`BasicTrainer(..., key=jax.random.key(0))`); each step, device and "
            "example then gets its own key."
        ) from e
    except (TypeError, ValueError) as e:
        check_axis_names(model, e)
        first = (str(e).strip().splitlines() or [""])[0]
        ints = any(
            not jnp.issubdtype(jnp.result_type(a), jnp.inexact)
            for a in jax.tree_util.tree_leaves(x)
        )
        hint = (
            " Integer inputs are passed as they are (token ids): cast images with "
            "`images.astype(jnp.float32)`."
            if ints
            else ""
        )
        raise ValueError(
            f"the model cannot take `batch['image']` of {_describe(x)} (per device) "
            f"({type(e).__name__}: {first}); give each example the shape and dtype "
            "the model takes (channels last, (H, W, C) for the reference models), "
            "pass a model of several inputs its inputs as a tuple with "
            "forward=eqx_steps.per_example_args, or pass a `forward` that adapts "
            f"the batch.{hint}"
        ) from e


def call_criterion(
    fn: Callable[..., Any], name: str, output: PyTree, label: PyTree, *rest: Any
) -> Any:
    """`fn(output, label, *rest)`, naming reversed arguments when the call fails
    and `fn(label, output, *rest)` traces (runs when the step is traced)."""
    try:
        return fn(output, label, *rest)
    except (TypeError, ValueError) as e:
        try:
            jax.eval_shape(lambda a, b: fn(a, b, *rest), label, output)
        except Exception:  # noqa: BLE001 - not reversed: the original error stands
            raise e from None
        raise ValueError(
            f"`{name}` fails on (output, label) ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]}) but works on (label, "
            "output): its arguments look reversed. The steps call "
            f"`{name}(output, label)` (the model's output first, as optax's losses "
            "take (predictions, targets)): swap its parameters."
        ) from e

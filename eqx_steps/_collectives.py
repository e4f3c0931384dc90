"""The steps' collectives over the device axis, and what they warn about.

Means over `axis_name` that are skipped when there is no collective (one
device), the per-(step, device) PRNG key, and the one-time warning for
BatchNorm layers that normalise over each device's share of the batch.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.random as jr
from jaxtyping import PRNGKeyArray, PyTree

from .state import BATCH_AXIS, TrainState


if TYPE_CHECKING:
    from .steps import AxisName


class BatchStatisticsWarning(UserWarning):
    """BatchNorm layers compute their statistics per device on several devices.

    Raised (as a warning, once per compiled step) by the training steps when the
    model's `eqx.nn.BatchNorm` layers have `axis_name="batch"` alone and the
    step runs on more than one device: each device then normalises over its own
    share of the batch (SCICO's and Flax's behaviour), where a plain Equinox loop
    under `jax.jit` normalises over the whole batch. `axis_name=("device",
    "batch")` gives whole-batch statistics on any device count. The reference
    models of `eqx_steps.models` keep SCICO's per-device statistics by design and
    raise no warning.
    """


def _batch_norms_per_device(model: PyTree) -> list[str]:
    """The paths of the `eqx.nn.BatchNorm` layers with `axis_name="batch"` alone,
    except this library's reference models' (SCICO's architectures, whose
    per-device statistics are SCICO's by design and documented)."""
    is_bn = lambda x: isinstance(x, eqx.nn.BatchNorm)  # noqa: E731
    return [
        jax.tree_util.keystr(path) or "(the model)"
        for path, layer in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_bn)[0]
        if is_bn(layer)
        and layer.axis_name == BATCH_AXIS
        and not type(layer).__module__.startswith("eqx_steps.")
    ]


def warn_per_device_statistics(model: PyTree, axis_name: AxisName) -> None:
    """Warn (once per compiled step) when BatchNorm layers normalise over each
    device's examples only while the step runs on several devices."""
    if _no_collective(axis_name):
        return
    layers = _batch_norms_per_device(model)
    if layers:
        warnings.warn(
            f"the model's BatchNorm layers {', '.join(layers[:3])} normalise over "
            f'`axis_name="batch"` alone: on these {jax.lax.axis_size(axis_name)} '
            "devices each computes its statistics over its own share of the batch "
            "(SCICO's and Flax's behaviour), unlike a plain Equinox loop under "
            "jit, which normalises over the whole batch. Build them with "
            '`axis_name=("device", "batch")` for whole-batch statistics (the '
            "same on any device count), or silence this with "
            "`warnings.filterwarnings('ignore', "
            "category=eqx_steps.BatchStatisticsWarning)`.",
            BatchStatisticsWarning,
            stacklevel=2,
        )


def _no_collective(axis_name: AxisName) -> bool:
    # `None`, or an axis of one device: a mean over it is the identity. Skipping
    # it matters: XLA keeps a one-device all-reduce, with a second copy of every
    # gradient alive across it.
    return axis_name is None or jax.lax.axis_size(axis_name) == 1


def device_mean(tree: PyTree, axis_name: AxisName) -> PyTree:
    """`lax.pmean` over `axis_name`; the identity when it is `None` or has size 1."""
    if _no_collective(axis_name):
        return tree
    # One collective per leaf (XLA:CPU combines them by default): with its
    # all-reduce combiner off, XLA can then reduce and apply one gradient at a
    # time instead of keeping all of them alive twice (docs/performance.md).
    return jax.tree_util.tree_map(lambda x: jax.lax.pmean(x, axis_name), tree)


def mean_model_state(
    model_state: eqx.nn.State | None, axis_name: AxisName
) -> eqx.nn.State | None:
    """Average the floating-point leaves of `model_state` over `axis_name`.

    Integer leaves (counters) are equal on every device and are left as they are.
    """
    if model_state is None or _no_collective(axis_name):
        return model_state
    return jax.tree_util.tree_map(
        lambda x: jax.lax.pmean(x, axis_name) if eqx.is_inexact_array(x) else x,
        model_state,
    )


def step_key(state: TrainState, axis_name: AxisName) -> PRNGKeyArray | None:
    # One key per (step, device); `forward` splits it per example. Derived, not
    # carried, so a resumed run draws exactly the same keys.
    if state.key is None:
        return None
    key = jr.fold_in(state.key, state.step)
    if axis_name is not None:
        key = jr.fold_in(key, jax.lax.axis_index(axis_name))
    return key

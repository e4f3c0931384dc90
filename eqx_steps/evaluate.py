"""Evaluation over a whole dataset, by SCICO's definition (`evaluate_dataset`).

SCICO evaluates `metrics_fn` on each per-device batch and averages the results
over the devices and the batches. Its evaluation drops the examples that do not
fill a last batch; here they are evaluated too, as one smaller batch of their
own on one device (no padding ever reaches `metrics_fn`), and every batch is
weighted by its number of examples:

    metrics = (sum over full batches of B * m_b + r * m_rest) / (n_full * B + r)

so that every example counts exactly once and any scalar metric (a mean, an F1
score, an SNR over the whole batch) is combined as SCICO combines it.

The pass itself, `_evaluation_pass`, is shared with [`eqx_steps.only_apply`][]:
full batches through a parallel step on every device, the remainder through the
per-device step on one device.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TYPE_CHECKING

import equinox as eqx
import jax
import numpy as np

from ._validate import check_dataset, check_int, is_grain
from .data import create_input_iter, DeviceIter
from .platform import default_backend_jit
from .state import TrainState
from .steps import Batch, Criterion, eval_step, MetricsFn


if TYPE_CHECKING:
    from .pipeline import GrainIter


EvalFn = Callable[[TrainState, Batch], Mapping[str, Any]]
"""A parallel step `(state, sharded_batch) -> dict`, as `parallel_eval_step` builds."""

StepFn = Callable[..., Mapping[str, Any]]
"""A per-device step with `eval_step`'s signature."""


@default_backend_jit  # eqx.filter_jit, with the fast XLA:CPU options
def _on_one_device(
    step_fn: StepFn,
    state: TrainState,
    batch: Batch,
    criterion: Criterion | None,
    metrics_fn: MetricsFn | None,
) -> Mapping[str, Any]:
    # Module level, so that its compilations are cached across calls (the
    # functions are static arguments, hashed by identity).
    return step_fn(state, batch, criterion, metrics_fn, axis_name=None)


def _on_device(tree: Any, device: Any) -> Any:
    """`tree`'s arrays on `device`, without copying those already there."""

    def leaf(x):
        if isinstance(x, jax.Array) and x.sharding.is_fully_replicated:
            # A replicated (possibly multi-process) array: this device's copy.
            for shard in x.addressable_shards:
                if shard.device == device:
                    return shard.data
        return jax.device_put(x, device) if eqx.is_array(x) else x

    return jax.tree_util.tree_map(leaf, tree)


def _eval_iter(
    dataset: Mapping[str, Any],
    batch_size: int,
    max_batches: int | None = None,
    image_key: str | None = "image",
) -> tuple[DeviceIter | GrainIter, int, bool]:
    """The evaluation iterator over `dataset`, and what of it a pass runs.

    **Returns:**

    A 3-tuple of the iterator (`create_input_iter(..., train=False)`), the number
    of full batches to run and whether the smaller last batch runs too, given
    `max_batches` (the smaller last batch counting as one; `None`: all). For a
    Grain input, whose batches are counted as they come, `max_batches` (or no
    limit) and `True`: its smaller last batch runs when the pass reaches it.
    """
    data = create_input_iter(
        None, dataset, batch_size, train=False, image_key=image_key
    )
    if not isinstance(data, DeviceIter):  # Grain: its length shows at its end
        n = (
            sys.maxsize
            if max_batches is None
            else check_int("max_batches", max_batches)
        )
        return data, n, True
    total = data.num_batches + bool(data.remainder)
    if max_batches is not None:
        total = min(total, check_int("max_batches", max_batches))
    return data, min(total, data.num_batches), total > data.num_batches


def _evaluation_pass(
    parallel_fn: EvalFn,
    step_fn: StepFn,
    state: TrainState,
    data: DeviceIter | GrainIter,
    n_full: int,
    with_rest: bool,
    *,
    criterion: Criterion | None = None,
    metrics_fn: MetricsFn | None = None,
) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """One ordered pass over an evaluation iterator: `(examples, result)` per batch.

    The first `n_full` full batches of `data` (sharded over the local devices)
    run through `parallel_fn`; with `with_rest`, the remaining examples run as
    one smaller batch through `step_fn(state, batch, criterion, metrics_fn,
    axis_name=None)` on the first local device (under `eqx.filter_jit`; in a
    multi-process run every process evaluates the same remainder, so the results
    agree everywhere).

    **Arguments:**

    - `parallel_fn`: the parallel step for the full batches.
    - `step_fn`: the per-device step `parallel_fn` runs, for the remainder.
    - `state`: the state to evaluate.
    - `data`, `n_full`, `with_rest`: as `_eval_iter` returns them.
    - `criterion`, `metrics_fn`: passed to `step_fn` for the remainder.

    **Returns:**

    A generator of `(number of examples, result)`, one per batch, in order; the
    results stay on the devices.
    """
    count = 0
    for _, batch in zip(range(n_full), data):
        count += 1
        yield data.batch_size, parallel_fn(state, batch)
    # A Grain pass stopped at `n_full` batches has not reached its last batch.
    grain_cut = not isinstance(data, DeviceIter) and count == n_full
    rest = data.remainder_batch() if with_rest and not grain_cut else None
    if not isinstance(data, DeviceIter) and rest is None and count == 0:
        raise ValueError(
            f"`dataset` ({data.stream.kind}) yielded no batch to evaluate on; "
            "pass a dataset with at least one example."
        )
    if rest is not None and (criterion is None or metrics_fn is None):
        if step_fn is eval_step:  # the stock step needs both
            raise ValueError(
                f"the last batch of `dataset` holds {data.remainder} examples, fewer "
                f"than `batch_size` = {data.batch_size}: it is evaluated as one "
                "smaller batch on one device, which needs the per-device step's "
                "functions; pass `criterion=` and `metrics_fn=` (those given to "
                "`parallel_eval_step`), or batch the dataset with "
                "drop_remainder=True."
            )
    if rest is not None:
        if step_fn is eval_step:  # it never reads the optimizer state (ZeRO: cut)
            state = state.replace(opt_state=None)
        local = _on_device(state, jax.local_devices()[0])
        yield (
            data.remainder,
            _on_one_device(step_fn, local, rest, criterion, metrics_fn),
        )


def _weighted_mean(results: list[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
    """The mean of each metric over the batches, weighted by their examples."""
    names = list(results[0][1])
    sums = dict.fromkeys(names, 0.0)
    for count, metrics in results:
        if sorted(metrics) != sorted(names):
            raise ValueError(
                f"`metrics_fn` returned the metrics {sorted(metrics)} for one batch "
                f"and {sorted(names)} for another; return the same names for every "
                "batch."
            )
        for name, value in metrics.items():
            if np.ndim(value) != 0:
                raise ValueError(
                    f"`metrics_fn` returned {name!r} of shape {np.shape(value)}; "
                    "evaluation averages scalar metrics over devices and batches, "
                    f"so reduce {name!r} to a scalar in `metrics_fn` (e.g. its "
                    "mean over the batch)."
                )
            sums[name] += count * float(value)
    total = sum(count for count, _ in results)
    return {name: s / total for name, s in sums.items()}


def evaluate_dataset(
    eval_fn: EvalFn,
    state: TrainState,
    dataset: Mapping[str, Any] | Any,
    batch_size: int,
    *,
    max_batches: int | None = None,
    criterion: Criterion | None = None,
    metrics_fn: MetricsFn | None = None,
    eval_step_fn: StepFn = eval_step,
    image_key: str | None = "image",
) -> dict[str, float]:
    """The metrics of `state` over `dataset`, by SCICO's definition.

    `metrics_fn` on each per-device batch, averaged over the devices (by
    `eval_fn`) and over the batches. When `batch_size` does not divide the
    dataset, the remaining `r` examples are evaluated as one smaller batch of
    their own, on one device, by `eval_step_fn` with `criterion` and
    `metrics_fn`; each batch is weighted by its number of examples, so every
    example counts once:

        (sum over full batches of batch_size * m_b + r * m_rest) / n

    **Arguments:**

    - `eval_fn`: a function from [`eqx_steps.parallel_eval_step`][].
    - `state`: the state to evaluate.
    - `dataset`: a dict of arrays with `"image"` and `"label"` (each may be a
        PyTree of arrays, e.g. a tuple of a model's several inputs), or a Grain
        `MapDataset`, `IterDataset` or `DataLoader` yielding such dicts as
        batches of `batch_size` examples (global batches; see the "Data
        pipelines" page), one pass of which is evaluated, its last batch possibly
        smaller (batched with `drop_remainder=False`).
    - `batch_size`: the global batch size (a multiple of the device count).
    - `max_batches`: stop after this many batches, the smaller last one counting
        as one (SCICO's `steps_per_eval`; `None`: the whole dataset).
    - `criterion`, `metrics_fn`, `eval_step_fn`: those `eval_fn` was built with,
        for the remainder; needed only when `batch_size` does not divide the
        dataset.
    - `image_key`: the entry cast to floating point when it holds integer
        images (SCICO's cast, see [`eqx_steps.create_input_iter`][]); `None`
        keeps every integer entry (token ids) as it is.

    **Returns:**

    A dict of the metrics, as Python floats.

    **Raises:**

    `ValueError` when a metric is not a scalar (naming it), or when there is a
    remainder to evaluate and `criterion` or `metrics_fn` is missing.
    """
    if not is_grain(dataset):
        check_dataset("dataset", dataset)
    data, n_full, with_rest = _eval_iter(dataset, batch_size, max_batches, image_key)
    if (
        isinstance(data, DeviceIter)
        and with_rest
        and (criterion is None or metrics_fn is None)
    ):
        raise ValueError(
            f"`dataset` has {data.data.n} examples, not a multiple of `batch_size` = "
            f"{data.batch_size}: the last {data.remainder} are evaluated as one "
            "smaller batch on one device, which needs the per-device step's "
            "functions; pass `criterion=` and `metrics_fn=` (those given to "
            "`parallel_eval_step`), or a `batch_size` that divides the dataset."
        )
    results = _evaluation_pass(
        eval_fn,
        eval_step_fn,
        state,
        data,
        n_full,
        with_rest,
        criterion=criterion,
        metrics_fn=metrics_fn,
    )
    # The metrics stay on the devices until the pass is over: no wait per batch.
    return _weighted_mean(jax.device_get(list(results)))

"""Apply or evaluate a trained model on a dataset (`only_apply`, `only_evaluate`).

Which weights are used follows SCICO's rule: with `config["checkpointing"]` true
the latest checkpoint in `config["workdir"]` is restored; otherwise the model is
used as given. The keyword `use_checkpoint` overrides the rule, `workdir`
names the checkpoint folder explicitly.

Both run through the parallel evaluation path of
[`eqx_steps.evaluate_dataset`][]: full batches on every device, the remainder as
one smaller batch on one device.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from ._forward import per_example
from ._iterate_data import host_leaf
from ._model_checks import check_model_state
from ._step_checks import apply_forward, check_inputs
from ._validate import check_bool, check_dataset, check_divisible
from .checkpoint import checkpoint_restore
from .evaluate import _eval_iter, _evaluation_pass, evaluate_dataset
from .parallel import parallel_eval_step
from .state import DEVICE_AXIS, TrainState
from .steps import (
    AxisName,
    Batch,
    Criterion,
    MetricsFn,
)
from .trainer import TrainConfig


def _checkpoint_folder(
    cfg: TrainConfig, workdir: Any, use_checkpoint: bool | None
) -> tuple[str, str] | None:
    """The folder to restore from and how it was named, or `None` (as given)."""
    if use_checkpoint is not None:
        check_bool("use_checkpoint", use_checkpoint)
    if workdir is not None:
        if use_checkpoint is False:
            raise ValueError(
                f"`workdir` = {os.fspath(workdir)!r} names a checkpoint folder but "
                "`use_checkpoint` is False; pass one or the other."
            )
        return os.fspath(workdir), "`workdir`"
    if use_checkpoint or (use_checkpoint is None and cfg.checkpointing):
        return cfg.workdir, "config['workdir']"
    return None


def _restore_state(
    config: Mapping[str, Any] | TrainConfig,
    model: PyTree,
    model_state: eqx.nn.State | None = None,
    workdir: str | os.PathLike | None = None,
    *,
    use_checkpoint: bool | None = None,
    forward: Callable = per_example,
) -> tuple[TrainConfig, TrainState]:
    """The state a run with `config` builds, with the weights SCICO's rule picks.

    The state is built as `BasicTrainer` builds it (`config`'s
    `create_train_state`, optimizer and schedule), so that it has the structure
    of the run's checkpoints. Its weights are restored from the latest checkpoint
    in `workdir` when it is given, else in `config["workdir"]` when
    `config["checkpointing"]` is true (or `use_checkpoint` is `True`); otherwise
    (or with `use_checkpoint=False`) they are `model` and `model_state` as given.
    The restored step is printed on stderr.

    **Arguments:**

    - `config`: the run's configuration (a dict or a `TrainConfig`).
    - `model`, `model_state`: a model (and its state) of the run's structure.
    - `workdir`: a checkpoint folder to restore from, overriding `config`.
    - `use_checkpoint`: `None` (SCICO's rule), `True` (restore) or `False` (the
        weights as given).
    - `forward`: how the model is applied to a batch.

    **Returns:**

    A 2-tuple of the validated `TrainConfig` and the state.

    **Raises:**

    `FileNotFoundError` naming the folder when it holds no checkpoint;
    `ValueError` naming `model_state` when `model` has layers that keep a state
    (e.g. `eqx.nn.BatchNorm`) and `model_state` is `None`.
    """
    cfg = TrainConfig.from_dict(config)
    check_model_state(model, model_state)
    folder = _checkpoint_folder(cfg, workdir, use_checkpoint)
    schedule_config = {**cfg.to_dict(), "steps_per_epoch": 1}
    state = cfg.create_train_state(
        schedule_config,
        model,
        cfg.lr_schedule(schedule_config),
        model_state=model_state,
    )
    if forward is not state.forward:
        state = state.replace(forward=forward)
    if folder is None:
        return cfg, state
    path, named = folder
    try:
        state = checkpoint_restore(state, path, ok_no_ckpt=False)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no checkpoint to restore from {named} = {path!r}: {e} To use the "
            "weights of `model` and `model_state` as given, pass "
            "use_checkpoint=False."
        ) from None
    if jax.process_index() == 0:
        print(
            f"eqx_steps: restored checkpoint step {int(state.step)} from {path!r}",
            file=sys.stderr,
            flush=True,
        )
    return cfg, state


def check_forward(forward: Any) -> Callable:
    if not callable(forward):
        raise TypeError(
            f"`forward` must be a function (e.g. eqx_steps.per_example_args), got "
            f"{forward!r}."
        )
    return forward


def _check_test_ds(test_ds: Any, keys: tuple[str, ...]) -> None:
    """`test_ds` a dict with `keys`, holding at least one example."""
    check_dataset("test_ds", test_ds, keys)
    for path, leaf in jax.tree_util.tree_flatten_with_path(test_ds["image"])[0]:
        name = f"test_ds['image']{jax.tree_util.keystr(path)}"
        images = host_leaf(name, leaf)
        if images.shape[0] == 0:
            raise ValueError(
                f"`test_ds` has no examples (`{name}` has shape {images.shape}); "
                "pass at least one example."
            )


def _batch_size(cfg: TrainConfig) -> int:
    n = jax.device_count()
    size = cfg.batch_size or 2 * n
    return check_divisible("config['batch_size']", size, n, "devices")


def _output_step(
    state: TrainState,
    batch: Batch,
    criterion: Criterion | None = None,
    metrics_fn: MetricsFn | None = None,
    *,
    axis_name: AxisName = DEVICE_AXIS,
) -> dict[str, PyTree]:
    """The model's outputs on one device's share of a batch, gathered over devices.

    An `eval_step_fn` for [`eqx_steps.parallel_eval_step`][] that returns the
    outputs instead of metrics: the model runs in inference mode on
    `batch["image"]`, and the outputs of all devices are gathered in device order
    over `axis_name` (so every device holds the whole batch's outputs, in order).

    **Arguments:**

    - `state`: the [`eqx_steps.TrainState`][].
    - `batch`: a dict with `"image"`.
    - `criterion`, `metrics_fn`: unused (`eval_step`'s signature).
    - `axis_name`: the device axis to gather over, or `None`.

    **Returns:**

    `{"output": outputs}`, the leading axis the examples of the whole batch.
    """
    check_inputs(state, batch, training=False)
    model = eqx.nn.inference_mode(state.model)  # the model itself, any `forward`
    output, _ = apply_forward(state, model, batch["image"], inference=True)
    if axis_name is not None:
        output = jax.tree_util.tree_map(
            lambda y: jax.lax.all_gather(y, axis_name, tiled=True), output
        )
    return {"output": output}


def only_apply(
    config: Mapping[str, Any] | TrainConfig,
    model: PyTree,
    test_ds: Mapping[str, Any],
    *,
    model_state: eqx.nn.State | None = None,
    workdir: str | os.PathLike | None = None,
    use_checkpoint: bool | None = None,
    forward: Callable = per_example,
) -> tuple[PyTree, tuple[PyTree, eqx.nn.State | None]]:
    """The model's output for every example of `test_ds`, and the weights used.

    SCICO's `only_apply`. The weights follow SCICO's rule: with
    `config["checkpointing"]` true, the latest checkpoint in `config["workdir"]` is
    restored into a model of `model`'s structure (the step restored is printed on
    stderr), and a missing checkpoint is an error; otherwise `model` and
    `model_state` are used as given. To apply the given weights although
    `config["checkpointing"]` is true, pass `use_checkpoint=False`; to restore
    from another folder, pass `workdir=`.

    The model runs in inference mode through the parallel evaluation path
    (`config["backend"]`): full batches of `config["batch_size"]` on every
    device, then the remaining examples as one smaller batch on one device.
    Unlike SCICO, the last partial batch is kept: one output per example, in
    order, on every process.

    **Arguments:**

    - `config`: the training configuration (`batch_size`, `backend`,
        `checkpointing`, `workdir`, and the optimizer and `create_train_state` that
        built the checkpoint, when restoring).
    - `model`: the trained model, or a model of the same structure when restoring.
    - `test_ds`: a dict with `"image"`, the model's input: an array, or a
        PyTree of arrays for a model of several inputs (with the `forward` that
        unpacks it); any other entry is ignored.
    - `model_state`: the model's `eqx.nn.State` (needed when the model has
        BatchNorm layers), or `None`.
    - `workdir`: a folder of checkpoints to restore the latest one from,
        whatever `config["checkpointing"]` says.
    - `use_checkpoint`: `None` (SCICO's rule, above), `True` (restore from
        `workdir` or `config["workdir"]`) or `False` (the weights as given).
    - `forward`: how the model is applied to a batch, as for
        [`eqx_steps.TrainState.create`][] (default [`eqx_steps.per_example`][];
        [`eqx_steps.per_example_args`][] for a model of several inputs).

    **Returns:**

    A 2-tuple of the outputs (one per example of `test_ds`, stacked, as NumPy
    arrays) and the weights used, `(model, model_state)` (SCICO's
    `(output, variables)`).

    **Raises:**

    `FileNotFoundError` when a checkpoint is to be restored and there is none;
    `ValueError` naming `model_state` when the model needs one and it is `None`.
    """
    _check_test_ds(test_ds, ("image",))
    cfg, state = _restore_state(
        config,
        model,
        model_state,
        workdir,
        use_checkpoint=use_checkpoint,
        forward=check_forward(forward),
    )
    apply_fn = parallel_eval_step(
        cfg.criterion,
        cfg.metrics_fn,
        eval_step_fn=_output_step,
        backend=cfg.backend,  # pyright: ignore
    )
    images = test_ds["image"]
    n = np.shape(jax.tree_util.tree_leaves(images)[0])[0]
    # The parallel step reads a "label": an empty one per example costs nothing.
    data = {"image": images, "label": np.zeros((n, 0), np.float32)}
    it, n_full, with_rest = _eval_iter(data, _batch_size(cfg))
    host: list[PyTree] = []
    pending: collections.deque[PyTree] = collections.deque()
    for _, result in _evaluation_pass(
        apply_fn, _output_step, state, it, n_full, with_rest
    ):
        pending.append(result["output"])
        if len(pending) > 2:  # copy to the host one batch behind the devices
            host.append(jax.device_get(pending.popleft()))
    host.extend(jax.device_get(list(pending)))
    outputs = jax.tree_util.tree_map(lambda *ys: np.concatenate(ys), *host)
    return outputs, (state.model, state.model_state)


def only_evaluate(
    config: Mapping[str, Any] | TrainConfig,
    model: PyTree,
    test_ds: Mapping[str, Any],
    *,
    model_state: eqx.nn.State | None = None,
    workdir: str | os.PathLike | None = None,
    use_checkpoint: bool | None = None,
    forward: Callable = per_example,
) -> dict[str, float]:
    """The metrics of the model over `test_ds`, by SCICO's definition.

    `config`'s `metrics_fn` (default `{"loss", "snr"}`) on each per-device batch,
    averaged over devices and batches, the last partial batch evaluated as one
    smaller batch and weighted by its size (see [`eqx_steps.evaluate_dataset`][]).
    The weights follow SCICO's rule, as for [`eqx_steps.only_apply`][].

    **Arguments:** as for [`eqx_steps.only_apply`][]; `test_ds` needs `"image"` and
    `"label"`.

    **Returns:**

    A dict of metrics.
    """
    _check_test_ds(test_ds, ("image", "label"))
    cfg, state = _restore_state(
        config,
        model,
        model_state,
        workdir,
        use_checkpoint=use_checkpoint,
        forward=check_forward(forward),
    )
    eval_fn = parallel_eval_step(
        cfg.criterion,
        cfg.metrics_fn,
        eval_step_fn=cfg.eval_step_fn,
        backend=cfg.backend,  # pyright: ignore
    )
    return evaluate_dataset(
        eval_fn,
        state,
        test_ds,
        _batch_size(cfg),
        criterion=cfg.criterion,
        metrics_fn=cfg.metrics_fn,
        eval_step_fn=cfg.eval_step_fn,
    )

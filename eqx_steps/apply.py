"""Apply or evaluate a trained model on a dataset (`only_apply`, `only_evaluate`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, PyTree

from .checkpoint import checkpoint_restore
from .data import IterateData
from .parallel import parallel_eval_step
from .state import TrainState
from .trainer import _check_dataset, evaluate_dataset, TrainConfig


def restore_state(
    config: Mapping[str, Any] | TrainConfig,
    model: PyTree,
    model_state: eqx.nn.State | None = None,
    workdir: str | os.PathLike | None = None,
) -> tuple[TrainConfig, TrainState]:
    """The state a run with `config` builds, restored from `workdir` if given.

    The state is built as `BasicTrainer` builds it (`config`'s
    `create_train_state`, optimizer and schedule), so that it has the structure
    of the run's checkpoints.

    **Arguments:**

    - `config`: the run's configuration (a dict or a `TrainConfig`).
    - `model`, `model_state`: a model (and its state) of the run's structure.
    - `workdir`: the checkpoint folder; `None` keeps `model` as given.

    **Returns:**

    A 2-tuple of the validated `TrainConfig` and the state.

    **Raises:**

    `FileNotFoundError` naming `workdir` when it holds no checkpoint.
    """
    cfg = TrainConfig.from_dict(config)
    schedule_config = {**cfg.to_dict(), "steps_per_epoch": 1}
    state = cfg.create_train_state(
        schedule_config,
        model,
        cfg.lr_schedule(schedule_config),
        model_state=model_state,
    )
    if workdir is not None:
        # Raises FileNotFoundError naming the folder when it holds no checkpoint.
        state = checkpoint_restore(state, os.fspath(workdir), ok_no_ckpt=False)
    return cfg, state


def _batch_size(cfg: TrainConfig) -> int:
    n = jax.device_count()
    size = cfg.batch_size or 2 * n
    if size % n:
        raise ValueError(
            f"config['batch_size'] = {size} is not divisible by the {n} devices; use "
            f"a multiple of {n}."
        )
    return size


def only_apply(
    config: Mapping[str, Any] | TrainConfig,
    model: PyTree,
    test_ds: Mapping[str, Any],
    *,
    model_state: eqx.nn.State | None = None,
    workdir: str | os.PathLike | None = None,
) -> Array:
    """The model's output for every example of `test_ds`, in order.

    Runs the model in inference mode on all local devices, batch by batch; unlike
    SCICO, the last partial batch is kept, so there is one output per example.

    **Arguments:**

    - `config`: the training configuration (`batch_size`, and the optimizer and
        `create_train_state` that built the checkpoint, when restoring).
    - `model`: the trained model, or a model of the same structure when restoring.
    - `test_ds`: a dict with `"image"` (and optionally `"label"`).
    - `model_state`: the model's `eqx.nn.State`, or `None`.
    - `workdir`: a folder of checkpoints to restore the latest one from; `None`
        uses `model` and `model_state` as given.

    **Returns:**

    The outputs, stacked: one per example of `test_ds`.
    """
    if not isinstance(test_ds, Mapping) or "image" not in test_ds:
        raise ValueError(
            "`test_ds` must be a dict with an 'image' array of inputs, got "
            f"{type(test_ds).__name__}"
            + (f" with keys {sorted(test_ds)}" if isinstance(test_ds, Mapping) else "")
            + "."
        )
    cfg, state = restore_state(config, model, model_state, workdir)
    batch_size = _batch_size(cfg)
    data = IterateData({"image": test_ds["image"]}, batch_size, train=False)
    mesh = Mesh(np.asarray(jax.local_devices()), ("device",))
    sharding = NamedSharding(mesh, P("device"))
    forward = eqx.filter_jit(
        lambda m, ms, x: state.forward(m, ms, x, inference=True)[0]
    )
    # The weights on every local device, the batch split across them.
    replicated = NamedSharding(mesh, P())
    model, model_state = jax.tree_util.tree_map(
        lambda x: jax.device_put(x, replicated) if eqx.is_array(x) else x,
        (state.model, state.model_state),
    )
    outputs = []
    for batch in data:
        x = jax.device_put(np.asarray(batch["image"]), sharding)
        y = forward(model, model_state, x)
        n = int(np.sum(batch["mask"]))
        outputs.append(np.asarray(y)[:n])
    return np.concatenate(outputs, axis=0)  # pyright: ignore


def only_evaluate(
    config: Mapping[str, Any] | TrainConfig,
    model: PyTree,
    test_ds: Mapping[str, Any],
    *,
    model_state: eqx.nn.State | None = None,
    workdir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """The metrics of the model over the whole of `test_ds`.

    Each example counts exactly once (the last partial batch is padded and
    masked); the metrics are `config`'s `metrics_fn` (default `{"loss", "snr"}`)
    averaged over the examples.

    **Arguments:** as for [`eqx_steps.only_apply`][]; `test_ds` needs `"image"` and
    `"label"`.

    **Returns:**

    A dict of metrics.
    """
    _check_dataset("test_ds", test_ds)
    cfg, state = restore_state(config, model, model_state, workdir)
    eval_fn = parallel_eval_step(
        cfg.criterion,
        cfg.metrics_fn,
        eval_step_fn=cfg.eval_step_fn,
        backend=cfg.backend,  # pyright: ignore
    )
    return evaluate_dataset(eval_fn, state, test_ds, _batch_size(cfg))

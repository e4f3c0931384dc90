"""How `BasicTrainer` sets up a run: the checks and warnings about its model and
data, the initial (or restored) state, the training-step functions per call
size, and how many steps each call runs."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jaxtyping import PyTree

from ._config import TrainConfig
from ._forward import per_example
from ._validate import DATA_KEYS, is_integer_image
from .checkpoint import checkpoint_restore, prepare_workdir
from .parallel import parallel_train_step
from .state import TrainState
from .steps import eval_step, train_step


def initial_state(
    cfg: TrainConfig,
    config: Mapping[str, Any],
    model: PyTree,
    schedule: optax.Schedule,
    *,
    tx: optax.GradientTransformation | None,
    fallback: bool,
    **options: Any,
) -> TrainState:
    """The state to start from: created as `BasicTrainer` documents, then restored
    from `cfg.workdir` when checkpointing (after checking that the folder is
    writable and removing the temporary folders of interrupted saves)."""
    if tx is not None:
        state = TrainState.create(model, tx, **options)
    else:
        state = cfg.create_train_state(
            config, model, schedule, model_state=options["model_state"]
        )
        if not isinstance(state, TrainState):
            raise TypeError(
                "config['create_train_state'] must return an eqx_steps.TrainState, "
                f"got {type(state).__name__}."
            )
        defaults = {"key": None, "trainable": eqx.is_inexact_array}
        if options["forward"] is not per_example or any(
            options[k] is not v for k, v in defaults.items()
        ):
            options["model_state"] = state.model_state
            state = TrainState.create(state.model, state.tx, **options)
    if cfg.checkpointing:
        workdir = os.path.abspath(cfg.workdir)
        prepare_workdir(workdir, clean=jax.process_index() == 0)
        state = checkpoint_restore(state, workdir, ok_no_ckpt=True, fallback=fallback)
    return state


def train_fns(cfg: TrainConfig, schedule: optax.Schedule | None) -> dict[int, Callable]:
    """The parallel training steps by steps per call: 1 and `cfg.steps_per_call`."""
    return {
        k: parallel_train_step(
            schedule,
            cfg.criterion,
            cfg.metrics_fn,
            post_lst=cfg.post_lst,
            train_step_fn=cfg.train_step_fn,
            backend=cfg.backend,
            donate=True,  # the trainer owns its states
            steps_per_call=k,
            nan_policy=cfg.nan_policy,
            shard_optimizer_state=cfg.shard_optimizer_state,
        )
        for k in {1, cfg.steps_per_call}
    }


def call_size(step: int, k: int, end: int, periods: list[int]) -> int:
    """`k` steps, or 1 when fewer than `k` remain before `end` or the next
    multiple of one of the `periods`."""
    stop = min([end] + [(step // p + 1) * p for p in periods])
    return k if stop - step >= k else 1


def check_model(model: Any) -> None:
    """Refuse a model with no floating-point array to train (e.g. a plain
    function)."""
    if not jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)):
        raise TypeError(
            f"`model` ({getattr(model, '__name__', type(model).__name__)}) holds no "
            "trainable array (no floating-point array leaf): nothing to train. "
            "Pass an Equinox module with parameters, e.g. "
            "`eqx.nn.MLP(..., key=jax.random.key(0))`, not a plain function."
        )


def warn_unscaled_images(images: Any, is_image: bool) -> None:
    """Warn when the input images' range is clearly not [0, 1] (SCICO's cast of
    integer images keeps their values: 0..255 stays 0..255)."""
    if isinstance(images, (tuple, list, Mapping)) or not hasattr(images, "dtype"):
        return
    floating = np.issubdtype(np.dtype(images.dtype), np.floating)
    if not (floating or (is_image and is_integer_image(images))):
        return
    if np.ndim(images) < 3:  # vectors, not images
        return
    sample = np.asarray(images[:256])
    if sample.size == 0:
        return
    low, high = float(sample.min()), float(sample.max())
    if high > _IMAGE_RANGE_LIMIT or low < -_IMAGE_RANGE_LIMIT:
        warnings.warn(
            f"the input images range over [{low:g}, {high:g}] (dtype "
            f"{images.dtype}), clearly not [0, 1]: they are cast to floating point "
            "with their values kept (as SCICO does), so losses, learning rates and "
            "noise levels act on that scale. Scale them first if that is not "
            "meant, e.g. `images.astype(np.float32) / 255`.",
            stacklevel=3,
        )


_IMAGE_RANGE_LIMIT = 10.0
"""Input images with a value beyond +-this are clearly not in [0, 1]."""


def warn_unused_entries(cfg: TrainConfig, train: Any, test: Any) -> None:
    stock = cfg.train_step_fn is train_step and cfg.eval_step_fn is eval_step
    if not stock:
        return
    for name, data in (("train_ds", train), ("test_ds", test)):
        if data is None:
            continue
        extra = sorted(k for k in data if k not in DATA_KEYS)
        if extra:
            warnings.warn(
                f"`{name}` has entries {extra} that the stock steps do not read "
                f"(they read the input {cfg.input_key!r} and the target "
                f"{cfg.target_key!r}): they are copied to the devices with every "
                "batch and unused. Drop them, or read them in a custom "
                "`train_step_fn`/`eval_step_fn` (each batch holds them).",
                stacklevel=3,
            )

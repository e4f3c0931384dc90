"""How `BasicTrainer` sets up a run: the initial (or restored) state, the
training-step functions per call size, and how many steps each call runs."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import optax
from jaxtyping import PyTree

from ._config import TrainConfig
from ._forward import per_example
from .checkpoint import checkpoint_restore, prepare_workdir
from .parallel import parallel_train_step
from .state import TrainState


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

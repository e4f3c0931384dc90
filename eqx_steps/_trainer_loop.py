"""`BasicTrainer.train()`'s loop: steps, hooks at their points, signals.

The loop runs the compiled steps on the input's batches (several steps per
call where no log point, checkpoint or end comes between) and calls the hooks
(`_hooks.py`) after each call; a first SIGINT/SIGTERM ends it after the call in
flight, with a checkpoint. Functions of the trainer, which owns the state, the
input and the hooks.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, TYPE_CHECKING

from ._history import format_record, History, parameter_overview
from ._hooks import Hook, metrics_file, progress, progress_bar, Recorder, StepInfo
from ._preempt import StopRequests, TrainingInterrupted
from ._trainer_setup import call_size
from .checkpoint import checkpoint_save
from .state import TrainState


if TYPE_CHECKING:
    from .trainer import BasicTrainer


METRICS_FILE = "metrics.jsonl"
"""The file in `workdir` that the trainer appends a record to at each log point
(when `config["log"]`); it has no other writer."""


def _builtin_hooks(
    trainer: BasicTrainer, start: int, stack: contextlib.ExitStack
) -> list[Hook]:
    """The hooks every run has: records, checkpoints, metrics.jsonl, the bar."""
    cfg = trainer.config
    recorder = Recorder(trainer.history, trainer.evaluate)
    hooks = [Hook(recorder.collect, 1), Hook(recorder.record, trainer.log_every_steps)]
    if cfg.checkpointing:
        hooks.append(
            Hook(functools.partial(_save, trainer), trainer.steps_per_checkpoint)
        )
    if cfg.log and trainer.is_main:
        path = os.path.join(trainer.workdir, METRICS_FILE)
        hooks.append(
            Hook(metrics_file(path, start, trainer.history), trainer.log_every_steps)
        )
        bar = stack.enter_context(progress_bar(start, trainer.num_steps))
        hooks.append(Hook(progress(bar, trainer.history), 1))
    return hooks


def _save(trainer: BasicTrainer, info: StepInfo) -> None:
    checkpoint_save(
        info.state,
        trainer.config.to_dict(),
        trainer.workdir,
        data_state=trainer.input_state(info.step),
    )


def _stop(trainer: BasicTrainer, info: StepInfo, signum: int) -> TrainingInterrupted:
    """Save `info`'s state (with checkpointing) and say so, after a signal."""
    trainer.state = info.state
    if trainer.config.checkpointing:
        _save(trainer, info)
    return TrainingInterrupted(
        signum, info.step, info.state, trainer.config.checkpointing
    )


def run(trainer: BasicTrainer, stop: StopRequests) -> tuple[Any, History]:
    """`BasicTrainer.train()`'s loop, with `stop` taking the signals."""
    state = trainer.state
    step = int(state.step)
    trainer.log("Network Structure:")
    trainer.log(parameter_overview(state.model))
    if state.model_state is not None:
        trainer.log("Batch Normalization:")
        trainer.log(parameter_overview(state.model_state))
    if step >= trainer.num_steps:
        trainer.log(
            f"Nothing to do: the state is at step {step} of {trainer.num_steps}."
        )
        return _result(trainer, state)
    cfg = trainer.config
    periods = [trainer.log_every_steps]  # calls end exactly at these points
    if cfg.checkpointing:
        periods.append(trainer.steps_per_checkpoint)
    iters = {1: trainer.train_dt_iter}
    with contextlib.ExitStack() as stack:
        hooks = _builtin_hooks(trainer, step, stack) + trainer._hooks
        while step < trainer.num_steps:
            k = call_size(step, cfg.steps_per_call, trainer.num_steps, periods)
            if k not in iters or iters[k].step != step:
                iters[k] = trainer.input.iterator(step, k)
            try:
                batch = next(iters[k])
            except Exception as e:
                if not trainer.input.is_failure(e):
                    raise
                raise trainer.input.failed(e, step) from e
            state, metrics = trainer._train_fns[k](state, batch)
            before, step = step, step + k
            info = StepInfo(step, step // trainer.steps_per_epoch, state, metrics, k)
            for hook in hooks:
                if hook.due(before, step, last=step == trainer.num_steps):
                    hook.fn(info)
            signum = stop.agreed()
            if signum is not None:
                raise _stop(trainer, info, signum)
    trainer.state = state
    if trainer.history.records:
        trainer.log("Done: " + format_record(trainer.history.records[-1]))
    return _result(trainer, state)


def _result(trainer: BasicTrainer, state: TrainState) -> tuple[Any, History]:
    if trainer.config.return_state:
        return state, trainer.history
    return (state.model, state.model_state), trainer.history

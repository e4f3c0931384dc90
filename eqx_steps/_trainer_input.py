"""`BasicTrainer`'s training input: what `train_ds` is, and its batches by step.

A dict of arrays (shuffled and batched by `create_input_iter`), a user's own
iterable of batches ([`BatchStream`][]) or a Grain input ([`GrainStream`][],
whose state each checkpoint stores). Whatever it is, the trainer asks it for an
iterator from a step, for the number of steps in an epoch and for the state to
save with a checkpoint.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sized
from typing import Any, TYPE_CHECKING

import numpy as np
from jaxtyping import PRNGKeyArray

from ._batch_stream import BatchStream
from ._config import TrainConfig
from ._validate import check_dataset, DATA_KEYS, is_grain
from .checkpoint import latest_step, load_data_state
from .data import create_input_iter


if TYPE_CHECKING:
    from .pipeline import GrainStream


def is_iterable(x: Any) -> bool:
    """Whether `x` is an iterable of batches (not a string or an array)."""
    return isinstance(x, Iterable) and not isinstance(x, (str, bytes, np.ndarray))


def as_step_batch(name: str, data: Any, keys: tuple[str, str]) -> dict[str, Any]:
    """`data` with its input and target under the names the steps read, `"image"`
    and `"label"` (other entries kept)."""
    check_dataset(name, data, keys)
    if keys == DATA_KEYS:
        return dict(data)
    for k in DATA_KEYS:
        if k in data and k not in keys:
            raise ValueError(
                f"`{name}` has an entry {k!r} beside the input {keys[0]!r} and the "
                f"target {keys[1]!r}; the steps read the input as {DATA_KEYS[0]!r} "
                f"and the target as {DATA_KEYS[1]!r}: rename that entry."
            )
    rest = {k: v for k, v in data.items() if k not in keys}
    return {"image": data[keys[0]], "label": data[keys[1]], **rest}


class TrainInput:
    """The training input of one `BasicTrainer`.

    Built from `train_ds` (its first batch read, a Grain input set at the
    latest checkpoint's state first), then [`TrainInput.configure`][]d once the
    trainer knows the batch size and dtype, then [`TrainInput.start`][]ed at the
    step of the initial (or restored) state.
    """

    def __init__(self, train_ds: Any, cfg: TrainConfig):
        self.config = cfg
        keys = (cfg.input_key, cfg.target_key)
        self.stream: BatchStream | None = None
        self.grain: GrainStream | None = None
        self.data: dict[str, Any] | None = None  # a dict of arrays
        self._step = 0  # where a Grain input is set
        self._len: int | None = None  # the length of a user's iterable
        if is_grain(train_ds):
            from .pipeline import GrainStream, PipelineError
            from .pipeline._common import renamed

            self.grain = GrainStream(
                renamed(train_ds, lambda b: as_step_batch("train_ds", b, keys)),
                cfg.batch_size,
                train=True,
                name="train_ds",
            )
            # Set at the checkpoint's state before the first read: a loader's
            # workers start once, at the resumed position.
            self._step = self._resume()
            try:
                self.first = self.grain.peek()
            except PipelineError as e:
                raise self.failed(e, self._step) from e
        elif not isinstance(train_ds, Mapping) and is_iterable(train_ds):
            self.stream = BatchStream(
                train_ds,
                dtype=None,  # set by `configure`, once the model's dtype is known
                image_key=None,
                rename=lambda batch: as_step_batch("train_ds", batch, keys),
            )
            self.first = self.stream.first
            self._len = len(train_ds) if isinstance(train_ds, Sized) else None
        else:
            check_dataset("train_ds", train_ds, keys)
            self.data = self.first = as_step_batch("train_ds", train_ds, keys)

    def configure(
        self, data_key: PRNGKeyArray, batch_size: int, dtype: Any, image_key: Any
    ) -> int:
        """Set how batches are cut, cast and placed; the steps in an epoch."""
        self.data_key, self.batch_size = data_key, batch_size
        self.dtype, self.image_key = dtype, image_key
        num_steps = self.config.num_steps
        if self.stream is not None:
            self.stream.dtype, self.stream.image_key = dtype, image_key
            if self._len is None and num_steps is None:
                raise ValueError(
                    "`train_ds` is an iterable of batches without a length, so the "
                    "run has no epochs to count: set config['num_steps'] (the "
                    "number of training steps)."
                )
            return self._len or num_steps or 1
        if self.grain is not None:
            size = self.grain.steps_per_epoch
            if size is None and num_steps is None:
                raise ValueError(
                    f"`train_ds` is a Grain {self.grain.kind} without a length, so "
                    "the run has no epochs to count: set config['num_steps'] (the "
                    "number of training steps)."
                )
            return size or num_steps or 1
        self._first_iter = self.iterator(0, 1)
        return int(self._first_iter.steps_per_epoch)

    def start(self, step: int) -> Any:
        """The one-step iterator from `step`, the step of the initial state."""
        if self.stream is not None:
            self.stream.step = step
        elif self.grain is not None:
            if step != self._step:  # e.g. restored by fallback
                self._restore(step)
        elif not step:
            return self._first_iter
        return self.iterator(step, 1)

    def iterator(self, step: int, steps_per_call: int) -> Any:
        """The iterator of batches from `step`, `steps_per_call` per item."""
        if self.stream is not None:  # a user's iterable: read on, never rewound
            return self.stream.view(steps_per_call)
        if self.grain is not None:  # one stream, read forwards, held by step
            from .pipeline import GrainIter

            return GrainIter(
                self.grain,
                start_step=step,
                steps_per_call=steps_per_call,
                dtype=self.dtype,
                image_key=self.image_key,
            )
        assert self.data is not None
        return create_input_iter(
            self.data_key,
            self.data,
            self.batch_size,
            train=True,
            dtype=self.dtype,
            steps_per_call=steps_per_call,
            start_step=step,
            name="train_ds",
            shuffle=self.config.shuffle,
            image_key=self.image_key,
        )

    def checkpoint_state(self, step: int) -> dict[str, Any] | None:
        """The state to save with the checkpoint of `step` (Grain inputs only)."""
        return None if self.grain is None else self.grain.checkpoint_state(step)

    def is_failure(self, error: Exception) -> bool:
        """Whether `error` is a failure of a Grain input (a worker, a file)."""
        return self.grain is not None and self.grain.failed(error)

    def failed(self, error: Exception, step: int) -> Exception:
        """`error` with where the run stopped and what was saved."""
        if self.grain is not None:
            self.grain.close()
        cfg = self.config
        if not cfg.checkpointing:
            saved = "nothing was saved (checkpointing is off)."
        else:
            workdir = os.path.abspath(cfg.workdir)
            last = latest_step(workdir)
            saved = (
                f"the last checkpoint, step {last} in {workdir!r}, is intact: fix "
                "the input and run again to resume from it, with the batches the "
                "uninterrupted run would have seen."
                if last is not None
                else f"no checkpoint was saved yet in {workdir!r}."
            )
        from .pipeline import PipelineError

        return PipelineError(f"{error} The run stopped at step {step}; {saved}", step)

    def _resume(self) -> int:
        """Set the Grain input at the state of the latest checkpoint, if it holds
        one; the step it is set at (0: none). The trainer then restores the
        train state; should it restore another step (`fallback`), `start` sets
        the input again, at that step."""
        assert self.grain is not None
        if not self.config.checkpointing:
            return 0
        workdir = os.path.abspath(self.config.workdir)
        step = latest_step(workdir)
        if not step:
            return 0
        try:
            saved = load_data_state(workdir, step=step)
        except (OSError, ValueError):  # a damaged step: initial_state says how
            return 0
        if saved is None:
            return 0
        self.grain.restore(step, saved)
        return step

    def _restore(self, step: int) -> None:
        """Continue the Grain input from the state saved with checkpoint `step`;
        from its start (with a warning) when that checkpoint holds none."""
        assert self.grain is not None
        saved = None
        if step and self.config.checkpointing:
            saved = load_data_state(os.path.abspath(self.config.workdir), step=step)
        self.grain.restore(step, saved)
        if saved is None and step:
            warnings.warn(
                f"the checkpoint of step {step} holds no input-pipeline state (it "
                "was written by a run on a dict of arrays, or by an older version): "
                "`train_ds` is read from its start, so the resumed run does not see "
                "the batches the uninterrupted run would have.",
                stacklevel=4,
            )

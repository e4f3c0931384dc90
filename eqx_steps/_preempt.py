"""Stopping a training run cleanly on SIGINT or SIGTERM.

While `BasicTrainer.train()` runs, a first SIGINT (Ctrl-C) or SIGTERM (what a
cluster scheduler sends before it kills a job) only asks the loop to stop: the
loop finishes the call of the step in flight, saves a checkpoint and raises
[`eqx_steps.TrainingInterrupted`][]. A second signal raises at once, wherever
the program is (in a save too: orbax writes into a temporary folder and renames
it only when complete, so the previous checkpoint stays intact; the next start
removes the temporary folder).

In a multi-process job the processes must stop at the same step (checkpoints
are collective), so each call boundary exchanges the stop flags of all
processes (one tiny all-gather); a one-process run only reads a Python
attribute.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import numpy as np


SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """`BasicTrainer.train()` stopped on SIGINT or SIGTERM.

    A subclass of `KeyboardInterrupt`, so an `except Exception` does not swallow
    it and an uncaught one ends the program as Ctrl-C does.

    After a second signal (`step` is `None`) the threads of a checkpoint save
    may still be writing: end the process with `os._exit(e.exit_status)`, as
    `eqx-steps train` does, not `sys.exit`, whose interpreter shutdown can abort
    on those threads (`FATAL: exception not rethrown`, status -6). The previous
    checkpoint is intact either way.

    **Attributes:**

    - `signal`: the `signal.Signals` that stopped the run.
    - `step`: the step reached (the steps of the call in flight included), or
        `None` when a second signal stopped the run at once.
    - `state`: the [`eqx_steps.TrainState`][] at `step` (or `None`).
    - `checkpoint`: whether a checkpoint of `step` is in the run's `workdir`
        (`False` without `checkpointing`, or after a second signal).
    """

    def __init__(
        self,
        signum: int,
        step: int | None = None,
        state: Any = None,
        checkpoint: bool = False,
    ):
        self.signal = signal.Signals(signum)
        self.step = step
        self.state = state
        self.checkpoint = checkpoint
        if step is None:
            text = f"training stopped at once by a second {self.signal.name}"
        else:
            saved = "checkpoint saved" if checkpoint else "no checkpoint saved"
            text = f"training interrupted by {self.signal.name} at step {step}; {saved}"
        super().__init__(text)

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by this signal: 128 + its number
        (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.signal)


class StopRequests:
    """A context manager that turns SIGINT/SIGTERM into a request to stop.

    Installed only in the main thread (elsewhere Python cannot set handlers, and
    signals keep their handlers); the previous handlers are restored on exit.

    **Arguments:**

    - `multi_process`: exchange the flags of all processes in
        [`StopRequests.agreed`][] (every process must call it at the same points).
    """

    def __init__(self, multi_process: bool):
        self.multi_process = multi_process
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum)
        self.signum = signum

    def agreed(self) -> int | None:
        """The signal number when this process (or, multi-process, any process)
        was asked to stop; else `None`."""
        if not self.multi_process:
            return self.signum
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(flags)) or None

"""What the pipeline modules share: the error of a failed read, the trainer's
renaming of a Grain input, the kind of a Grain input, and Grain's absl flags."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PipelineError(RuntimeError):
    """The input pipeline stopped: a transform that raised (in the main process
    or in a Grain worker process), an image that could not be decoded (with
    `on_error="raise"`), a worker process that died.

    Raised when reading a batch of a Grain input fails: the message names the
    cause (and, from `BasicTrainer`, the step and the last intact checkpoint);
    `__cause__` is the original exception. The training stops there; a run with
    checkpointing resumes from its last checkpoint, with the batches it would
    have seen.

    **Attributes:** `step`, the global step (batch number) whose batch could
    not be read, or `None` when not known.
    """

    def __init__(self, text: str, step: int | None = None):
        super().__init__(text)
        self.step = step


class Renamed:
    """A Grain input whose batches pass through `fn` (the trainer's renaming of
    the input and target entries)."""

    eqx_steps_grain_input = True  # what `is_grain` looks for

    def __init__(self, source: Any, fn: Callable[[Any], Any]):
        self.source, self.fn = source, fn


def renamed(source: Any, fn: Callable[[Any], Any]) -> Any:
    """`source` (a Grain input) with each batch passed through `fn`."""
    return Renamed(source, fn)


def kind(source: Any) -> str:
    for c in type(source).__mro__:
        if c.__module__.split(".")[0] == "grain" and c.__name__ in (
            "MapDataset",
            "IterDataset",
            "DataLoader",
        ):
            return c.__name__
    raise TypeError(f"not a Grain input: {type(source).__name__}")


def grain_ready() -> None:
    """Let Grain read its settings outside an absl program.

    Grain's worker processes read absl flags, which raise
    `UnparsedFlagAccessError` until the program's flags are parsed; a program
    that does not use `absl.app` never parses them. Marking them parsed keeps
    every flag at its default (as an absl program run without flags has them).
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

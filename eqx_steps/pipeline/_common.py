"""What the pipeline modules share: the error of a failed read, the trainer's
renaming of a Grain input, the kind of a Grain input, the check of one of its
batches, and Grain's absl flags."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from .._iterate_data import host_leaf


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


def host_batch(batch: Any, name: str, batch_size: int | None) -> tuple[Any, int]:
    """One element of the Grain input `name`, checked to be a batch: a dict of
    (PyTrees of) arrays with one leading size, as host arrays, and that size."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"`{name}` yielded a {type(batch).__name__}; each element of a "
            "Grain input must be a batch, a dict of arrays such as "
            "{'image': x, 'label': y}: batch the dataset with "
            "`.batch(batch_size, drop_remainder=True)`."
        )
    batch = {
        k: jax.tree_util.tree_map_with_path(
            lambda p, x, k=k: host_leaf(f"{name}[{k!r}]{jax.tree_util.keystr(p)}", x),
            v,
        )
        for k, v in batch.items()
    }
    sizes = {int(x.shape[0]) for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1:
        b = batch_size or "batch_size"
        raise ValueError(
            f"`{name}` yielded an element whose entries have different "
            f"leading sizes {sorted(sizes)}: each element of a Grain input must "
            "be a batch, every array with one row per example; a dataset of "
            f"single examples must be batched: `.batch({b}, drop_remainder=True)`."
        )
    return batch, sizes.pop()

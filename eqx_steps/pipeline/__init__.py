"""Grain input pipelines: `BasicTrainer`, `create_input_iter` and
`evaluate_dataset` read a Grain `MapDataset`, `IterDataset` or `DataLoader`
besides a dict of arrays.

A Grain input yields batches (the user batches with `.batch(batch_size,
drop_remainder=True)`): global batches, of which each process keeps its rows, or,
in a multi-process run, each process's share (a pipeline sharded by process).
Each checkpoint stores the input's state (JSON) beside the train state, and a
resumed run reads on with the batches the uninterrupted run would have seen. See
the "Data pipelines" page of the documentation.

The pieces:

- `_grain`: `GrainStream` (host batches by global step, validated and cut to
  this process's rows, with the Grain iterator's state after each) and
  `GrainIter` (items of batches, cast, shaped and placed on the devices).

Grain itself is imported only when a Grain input is read.
"""

from ._grain import (
    GrainIter as GrainIter,
    GrainStream as GrainStream,
    is_grain as is_grain,
    PipelineError as PipelineError,
    STATE_FORMAT as STATE_FORMAT,
)

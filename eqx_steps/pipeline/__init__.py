"""Input pipelines on Grain: Grain datasets and loaders as inputs, and datasets too
large to hold in memory, streamed.

`BasicTrainer`, `create_input_iter` and `evaluate_dataset` read a Grain
`MapDataset`, `IterDataset` or `DataLoader` of batches besides a dict of arrays:
global batches, of which each process keeps its rows, or, in a multi-process run,
each process's share (a pipeline sharded by process). Each checkpoint stores the
input's state (JSON) beside the train state, and a resumed run reads on with the
batches the uninterrupted run would have seen. See the "Data pipelines" page.

- [`eqx_steps.pipeline.image_folder_dataset`][]: random patches of a folder of
    images, decoded by Grain workers, fresh every epoch.

The pieces:

- `_grain`: `GrainStream` (host batches by global step, validated and cut to
  this process's rows, with the Grain iterator's state after each); it does
  not import Grain.
- `_grain_state`: the input state a checkpoint stores (`STATE_FORMAT`), the
  check that a saved state fits the input it resumes, the gather of every
  process's state.
- `_common`: `PipelineError`, the trainer's renaming of an input, the check of
  one element as a batch, Grain's absl flags.
- `_grain_iter`: `GrainIter` (items of batches, cast, shaped and placed on the
  devices).
- `_images`: the streamed image folders (imports Grain), from `_headers` (the
  images' sizes, read without decoding) and `_patches` (cutting, turning).

The rest of the library imports this package only when a Grain input is read,
so `import eqx_steps` and the command's start-up do not load Grain.
"""

from ._common import PipelineError as PipelineError
from ._grain import GrainStream as GrainStream, is_grain as is_grain
from ._grain_iter import GrainIter as GrainIter
from ._grain_state import STATE_FORMAT as STATE_FORMAT
from ._images import (
    image_folder_dataset as image_folder_dataset,
    ImageFolderDataset as ImageFolderDataset,
)

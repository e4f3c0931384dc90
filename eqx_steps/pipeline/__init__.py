"""Input pipelines on Grain: datasets too large to hold in memory, streamed.

- [`eqx_steps.pipeline.image_folder_dataset`][]: random patches of a folder of
    images, decoded by Grain workers, fresh every epoch.
"""

from ._images import (
    image_folder_dataset as image_folder_dataset,
    ImageFolderDataset as ImageFolderDataset,
    PipelineError as PipelineError,
)

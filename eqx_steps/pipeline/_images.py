"""Random patches of a folder of images, streamed through Grain.

[`eqx_steps.pipeline.image_folder_dataset`][] reads only the images' headers up
front. Each epoch, a fresh plan (a function of the seed and the epoch) says which
image every patch of the epoch comes from and where; the images are then decoded
one at a time, in an order shuffled per epoch, by Grain (in `workers` processes,
or threads of this one), each giving the patches the plan cuts from it. A
window shuffle mixes the patches of consecutive images, and they are batched.
Memory holds a few decoded images and one shuffle window of patches, whatever
the folder's size.

The pipeline is a Grain `IterDataset`, deterministic: the same arguments give the
same batches, whatever the number of workers.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import grain
import numpy as np

from .._validate import check_int, check_number
from ..images import (
    _patch_plan,
)
from ._common import grain_ready, PipelineError
from ._headers import (
    channels_of,
    check_sizes,
    ImageHeader,
    scan_images,
)
from ._patches import augment_patches, cut_patches


# Independent random streams of one seed.
_PLAN, _ORDER, _AUGMENT, _NOISE = range(4)


class _EpochPatches:
    """Index `i` of the repeated image list -> the patches the plan of epoch
    `i // n` cuts from its `i % n`-th image in that epoch's order.

    A pure function of `i`: each Grain worker computes the plans it needs (the
    last two are kept) and the output does not depend on the worker count.
    """

    def __init__(
        self,
        headers: Sequence[ImageHeader],
        channels: int,
        per_epoch: int,
        size: int,
        seed: int,
        augment: bool,
        on_error: str,
    ):
        self.headers = list(headers)
        self.channels = channels
        self.per_epoch = per_epoch
        self.size = size
        self.seed = seed
        self.augment = augment
        self.on_error = on_error
        self._plans: dict[int, Any] = {}

    def _plan(self, epoch: int) -> Any:
        if epoch not in self._plans:
            shapes = [(h.height, h.width) for h in self.headers]
            which, ys, xs = _patch_plan(
                shapes, self.per_epoch, self.size, [self.seed, _PLAN, epoch]
            )
            by_image = np.argsort(which, kind="stable")
            bounds = np.searchsorted(which[by_image], np.arange(len(shapes) + 1))
            order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(
                len(shapes)
            )
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1} | {
                epoch: (order, ys[by_image], xs[by_image], bounds)
            }
        return self._plans[epoch]

    def __call__(self, index: int, _: Any) -> np.ndarray:
        epoch, position = divmod(index, len(self.headers))
        order, ys, xs, bounds = self._plan(epoch)
        j = int(order[position])
        lo, hi = bounds[j], bounds[j + 1]
        if lo == hi:
            return np.zeros((0, self.size, self.size, self.channels), np.float32)
        patches = cut_patches(
            self.headers[j],
            self.channels,
            ys[lo:hi],
            xs[lo:hi],
            self.size,
            self.on_error,
        )
        if self.augment and len(patches):
            rng = np.random.default_rng([self.seed, _AUGMENT, epoch, j])
            patches = augment_patches(patches, rng)
        return patches

    def __getstate__(self) -> dict[str, Any]:  # workers start without plans
        return {**self.__dict__, "_plans": {}}


class _Unbatch(grain.experimental.FlatMapTransform):
    """An image's `(n, H, W, C)` patches -> its `n` patches, one at a time."""

    def __init__(self, max_fan_out: int):
        self.max_fan_out = max_fan_out

    def flat_map(self, element: np.ndarray) -> Any:
        # A copy: a worker's output lives in shared memory, released once the
        # last view of it goes; the shuffle window would hold such views.
        return np.array(element)


class _Pairs:
    """Batch `b` of clean patches -> `{"image": noisy, "label": clean}` (the
    noise drawn from the seed and `b`; none for `noise_std=None`)."""

    def __init__(self, noise_std: float | None, seed: int):
        self.noise_std, self.seed = noise_std, seed

    def __call__(self, b: int, clean: np.ndarray) -> dict[str, np.ndarray]:
        if self.noise_std is None:
            return {"image": clean, "label": clean}
        rng = np.random.default_rng([self.seed, _NOISE, b])
        z = rng.standard_normal(clean.shape, np.float32)
        return {"image": clean + np.float32(self.noise_std) * z, "label": clean}


class _Iterator(grain.DatasetIterator):
    """The pipeline's iterator, which lets go of it when the program ends.

    Grain's clean-up of a closed iterator (its `__del__`) fails once the
    interpreter has torn its modules down; so at exit each open `_Iterator` is
    closed and drops its pipeline, whose clean-up then runs while it can.
    """

    def __init__(self, pipeline: grain.DatasetIterator):
        super().__init__(pipeline)
        _close_at_exit(self)

    def __next__(self) -> Any:
        try:
            return next(self._parent)
        except StopIteration:
            raise
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            raise PipelineError(f"the image pipeline stopped: {text}") from e

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def release(self) -> None:
        """Close the pipeline (its worker processes, its shared memory) and let
        go of it."""
        self.close()
        self._parents = ()


_OPEN: weakref.WeakSet[_Iterator] = weakref.WeakSet()
_REGISTERED = False


def _close_at_exit(iterator: _Iterator) -> None:
    global _REGISTERED
    if not _REGISTERED:
        atexit.register(_release_open_iterators)
        _REGISTERED = True
    _OPEN.add(iterator)


def _release_open_iterators() -> None:
    import gc

    for iterator in list(_OPEN):
        iterator.release()
    _OPEN.clear()
    gc.collect()


class ImageFolderDataset(grain.IterDataset):
    """The Grain `IterDataset` that [`eqx_steps.pipeline.image_folder_dataset`][]
    returns: endless batches of patches, fresh every epoch.

    **Attributes:**

    - `headers`: the images it reads (path, height, width, channels).
    - `skipped`: `(path, reason)` of each image left out as unreadable when the
        folder was scanned (an image that fails later, while decoding, is skipped
        with a warning from the process that decoded it).
    - `channels`: 1 (all images grayscale) or 3.
    - `patches_per_epoch`, `batch_size`.

    `len(ds)` is the number of batches in one epoch,
    `patches_per_epoch // batch_size` (the trainer counts epochs by it); the
    iteration itself goes on through epoch after epoch.
    """

    def __init__(
        self,
        pipeline: grain.IterDataset,
        *,
        headers: list[ImageHeader],
        skipped: list[tuple[str, str]],
        channels: int,
        patches_per_epoch: int,
        batch_size: int,
    ):
        super().__init__(pipeline)
        self.headers = headers
        self.skipped = skipped
        self.channels = channels
        self.patches_per_epoch = patches_per_epoch
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.patches_per_epoch // self.batch_size

    def __iter__(self) -> grain.DatasetIterator:
        grain_ready()
        return _Iterator(self._parent.__iter__())

    def __str__(self) -> str:
        return (
            f"ImageFolderDataset({len(self.headers)} images, "
            f"{self.patches_per_epoch} patches per epoch)"
        )


def image_folder_dataset(
    folder: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    patch_size: int,
    batch_size: int,
    patches_per_epoch: int,
    seed: int = 0,
    augment: bool = False,
    noise_std: float | None = None,
    workers: int = 0,
    on_error: Literal["skip", "raise"] = "skip",
    shuffle_window: int = 1024,
    channels: int | None = None,
) -> ImageFolderDataset:
    """Batches of random patches of a folder of images, streamed through Grain.

    Only the image headers are read here. Every epoch draws new patches: which
    image each of the `patches_per_epoch` patches comes from (every position of
    every image equally likely, as [`eqx_steps.images.random_patches`][]) and
    where, from `seed` and the epoch. Grain then decodes the images one at a time,
    in an order shuffled per epoch (in `workers` processes, or two threads of
    this one), cuts each image's patches, optionally turns and flips them,
    mixes them within a window of `shuffle_window` patches and stacks them into
    batches. Memory holds a few decoded images and one window of patches, not
    the folder.

    Each batch is `{"image": x, "label": y}`: float32 `(batch_size, patch_size,
    patch_size, C)` patches in `[0, 1]`, channels-last (`C` is 3 when any image is
    in colour, grayscale images then repeated to three channels, as
    [`eqx_steps.images.read_images`][] does). `y` is the clean patch; `x` is `y`
    plus Gaussian noise of standard deviation `noise_std`, or `y` itself for
    `noise_std=None` (add the noise in the training step, e.g. with
    [`eqx_steps.synthetic.with_input_noise`][]).

    The same arguments give the same batches, whatever `workers`. The batches
    are global batches: `BasicTrainer(config, model, ds)` splits them over the
    local devices.

    **Arguments:**

    - `folder`: a folder of PNG/JPEG/TIFF files (the files whose names end in
        [`eqx_steps.images.IMAGE_SUFFIXES`][], in name order), or a list of
        image files.
    - `patch_size`: the patch height and width.
    - `batch_size`: the patches in a batch.
    - `patches_per_epoch`: the patches cut in one epoch (at least
        `batch_size`); batches run on across epochs.
    - `seed`: the seed of the patches, their order, the augmentation and the
        noise.
    - `augment`: turn each patch by a random multiple of 90 degrees and flip it
        horizontally or not (each of the 8 symmetries of the square equally
        likely).
    - `noise_std`: the standard deviation of the noise added to the input, or
        `None` for none.
    - `workers`: Grain worker processes decoding the images (0: two threads of
        this process).
    - `on_error`: an image that cannot be read is skipped with a warning
        (`"skip"`: the `skipped` attribute lists those found when the folder is
        scanned) or refused (`"raise"`): here with a `ValueError` naming the file
        when its header cannot be read, or, when its pixels cannot be decoded,
        while iterating with a [`eqx_steps.pipeline.PipelineError`][] naming it.
    - `shuffle_window`: how many patches are shuffled together (their memory:
        `shuffle_window * patch_size**2 * C * 4` bytes).
    - `channels`: `C`; `None`: 3 when any image is in colour, else 1. Give 3 to
        read grayscale images as colour ones (say, to match a test set that
        holds colour images).

    **Returns:**

    An [`eqx_steps.pipeline.ImageFolderDataset`][], a Grain `IterDataset` of
    endless batches; `len()` of it is the number of batches per epoch.

    **Raises:**

    `FileNotFoundError` for a missing folder; `ValueError` for a folder without
    readable images, an image smaller than the patch, an unreadable image with
    `on_error="raise"` or a bad argument (naming it). Iterating raises a
    [`eqx_steps.pipeline.PipelineError`][] when the pipeline stops (an image that
    cannot be decoded with `on_error="raise"`, a worker process that died).

    !!! example

        ```python
        ds = es.pipeline.image_folder_dataset(
            "photos/", patch_size=64, batch_size=16, patches_per_epoch=4096,
            noise_std=0.1, augment=True, workers=4,
        )
        trainer = es.BasicTrainer({"num_epochs": 10}, model, ds, test_ds)
        ```
    """
    patch_size = check_int("patch_size", patch_size, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    patches_per_epoch = check_int("patches_per_epoch", patches_per_epoch, minimum=1)
    if patches_per_epoch < batch_size:
        raise ValueError(
            f"`patches_per_epoch` ({patches_per_epoch}) is smaller than "
            f"`batch_size` ({batch_size}): an epoch would not fill one batch; "
            f"use patches_per_epoch >= {batch_size}."
        )
    seed = check_int("seed", seed, minimum=0)
    workers = check_int("workers", workers, minimum=0)
    shuffle_window = check_int("shuffle_window", shuffle_window, minimum=1)
    if noise_std is not None:
        noise_std = float(check_number("noise_std", noise_std, minimum=0.0))
    if not isinstance(augment, bool):
        raise TypeError(f"`augment` must be True or False, got {augment!r}.")
    headers, skipped = scan_images(folder, on_error)
    check_sizes(headers, patch_size)
    channels = channels_of(headers, channels)
    patches = _EpochPatches(
        headers, channels, patches_per_epoch, patch_size, seed, augment, on_error
    )
    threads = 1 if workers else 2
    ds = (
        grain.MapDataset.range(len(headers))
        .repeat(None)
        .map_with_index(patches)
        .to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        )
    )
    if workers:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
        )
    ds = grain.experimental.FlatMapIterDataset(
        ds, _Unbatch(max_fan_out=patches_per_epoch)
    )
    ds = grain.experimental.WindowShuffleIterDataset(
        ds,
        window_size=shuffle_window,
        seed=int(np.random.SeedSequence([seed, _ORDER]).generate_state(1)[0]),
    )
    ds = ds.batch(batch_size, drop_remainder=True).map_with_index(
        _Pairs(noise_std, seed)
    )
    return ImageFolderDataset(
        ds,
        headers=headers,
        skipped=skipped,
        channels=channels,
        patches_per_epoch=patches_per_epoch,
        batch_size=batch_size,
    )

"""The data of a run: synthetic phantoms, or patches of the user's own images.

- Without `--data`: [`eqx_steps.synthetic.make_denoising_data`][], a deterministic
    function of `--seed`, `--noise`, `--patch` and the set sizes (noise drawn
    once).
- With `--data FOLDER` (of several images): the images are streamed
    ([`eqx_steps.pipeline.image_folder_dataset`][]): only their headers are read
    here, every `HOLDOUT`-th image is held out for the test set, and Grain
    decodes the training images one at a time (`--workers` processes), cutting
    `--train-size` fresh random patches every epoch (turned and flipped with
    `--augment`). Memory holds a few images, whatever the folder's size. An
    unreadable image is skipped with a note and counted, or stops the run
    (`--on-bad-image`). The stream's position is saved in every checkpoint,
    so a resumed run reads on with the patches the uninterrupted run would have.
    In a multi-process run every process reads the same stream of global
    batches and keeps its own rows (memory stays bounded; each process decodes
    the batch's images).
- With `--data FILE` (one image, an .npy/.npz array; or a folder of one
    image): the images are read into memory
    ([`eqx_steps.images.read_images`][]), split into training and test images,
    `--train-size` random patches cut once from the training images.

Either way the training set holds clean patches and the noise is drawn inside
the training step ([`eqx_steps.synthetic.with_input_noise`][]): a new draw at
every step, seeded, so every epoch sees new noise, and a resumed run draws what
the uninterrupted one would have. The `--test-size` test patches are cut from the
held-out images, seeded, and get their noise once, so that every evaluation sees
the same test set; `evaluate` rebuilds it from the run's settings.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from ._errors import one_line, reported, UsageError


T = TypeVar("T")


HOLDOUT = 5
"""One image in `HOLDOUT` is a test image (a single image: its bottom
`1/HOLDOUT`)."""


@dataclasses.dataclass(frozen=True)
class Data:
    """The datasets of a run and how to train on them."""

    # A dict of arrays (empty when only the test set is needed), or the Grain
    # dataset of a streamed folder.
    train: Any
    test: dict[str, np.ndarray]
    channels: int
    description: str  # for the start-of-run summary
    train_step_fn: Callable | None = None  # None: the trainer's default


def load_data(settings: Mapping[str, Any], *, train: bool = True) -> Data:
    """The datasets the settings describe.

    **Arguments:**

    - `settings`: the run's settings (`data`, `patch`, `noise`, `seed`,
        `train_size`, `test_size`).
    - `train`: also build the training set (`evaluate` needs only the test set).

    **Returns:**

    A [`Data`][].

    **Raises:**

    `UsageError` for a missing, empty or unreadable PATH, or images smaller
    than the patch.
    """
    if settings.get("task", "denoise") != "denoise":  # deblur, ct: measurements
        from ._task_data import load_task_data

        return load_task_data(settings, train)
    if settings.get("data") is None:
        return _synthetic(settings, train)
    folder = _streamed_folder(settings)
    if folder is not None:
        return _from_folder(settings, folder, train)
    return _from_images(settings, train)


def _synthetic(settings: Mapping[str, Any], train: bool) -> Data:
    from ..synthetic import make_denoising_data

    with reported():
        train_ds, test_ds = make_denoising_data(
            settings["train_size"] if train else 1,
            settings["test_size"],
            size=settings["patch"],
            channels=1,
            noise_std=settings["noise"],
            seed=settings["seed"],
        )
    return Data(
        train_ds if train else {}, test_ds, 1, "synthetic phantoms (noise drawn once)"
    )


def split(
    images: list[tuple[str, np.ndarray]], patch: int
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Training and test images, the test ones held out.

    Several images: every `HOLDOUT`-th image (the 5th, 10th, ...; with fewer than
    `HOLDOUT`, the last) is a test image. A single image: its bottom
    `1/HOLDOUT` rows (at least one patch high) are the test image, the rest the
    training image.

    **Arguments:**

    - `images`: `(name, image)` pairs, as `read_images` returns them.
    - `patch`: the patch size.

    **Returns:**

    The training images, the test images and a description of the split.

    **Raises:**

    `UsageError` naming an image smaller than the patch, or a single image too
    small to split.
    """
    for name, im in images:
        _check_size(name, im.shape[:2], patch)
    arrays = [im for _, im in images]
    if len(arrays) > 1:
        train, test, how = held_out(arrays)
        return train, test, how
    (name, im), height = images[0], images[0][1].shape[0]
    rows = max(patch, height // HOLDOUT)
    if height - rows < patch:
        raise UsageError(
            f"image {name} is {height} pixels high: too small to hold out a test "
            f"band of {rows} rows and keep {patch} for training; use --patch "
            f"{height // 2} or less, or give several images"
        )
    return (
        [im[: height - rows]],
        [im[height - rows :]],
        f"one image, its bottom {rows} of {height} rows held out for the test set",
    )


def _check_size(name: str, shape: tuple[int, int], patch: int) -> None:
    if min(shape) < patch:
        raise UsageError(
            f"image {name} is {shape[0]}x{shape[1]} pixels, smaller than "
            f"--patch {patch}; use --patch {min(shape)} or less, or leave the "
            "image out"
        )


def held_out(items: Sequence[T]) -> tuple[list[T], list[T], str]:
    """Several images (or their headers) split into training and test ones: every
    `HOLDOUT`-th (the 5th, 10th, ...; with fewer than `HOLDOUT`, the last) is a
    test image."""
    test = [i for i in range(len(items)) if i % HOLDOUT == HOLDOUT - 1]
    test = test or [len(items) - 1]
    return (
        [x for i, x in enumerate(items) if i not in test],
        [items[i] for i in test],
        f"{len(items) - len(test)} training and {len(test)} held-out test images",
    )


def _streams(seed: int) -> list[np.random.SeedSequence]:
    """Independent streams of a run's seed: training patches, test patches, test
    noise, the noise of the training steps."""
    return np.random.SeedSequence(seed).spawn(4)


def _test_set(clean: np.ndarray, noise: float, noise_seq: Any) -> dict:
    z = np.random.default_rng(noise_seq).standard_normal(clean.shape, np.float32)
    return {"image": clean + np.float32(noise) * z, "label": clean}


def _streamed_folder(settings: Mapping[str, Any]) -> Any:
    """The headers of the `--data` folder when it is streamed (a folder of
    several readable images), else `None`."""
    import os

    path = settings["data"]
    if not os.path.isdir(path):
        return None
    import jax

    from ..pipeline._headers import scan_images

    # Skipped images are noted below on the command's own line, not as a
    # library warning.
    with reported("--data: "), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        headers, skipped = scan_images(path, settings["on_bad_image"])
    if len(headers) < 2:
        if skipped:  # read_images would stop at them
            raise UsageError(
                f"--data: cannot read image {skipped[0][0]!r}; leave it out"
            )
        return None
    if skipped and jax.process_index() == 0:
        reason = skipped[0][1]
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        print(
            f"eqx-steps train: --data: skipped {len(skipped)} unreadable image(s): "
            f"{one_line(reason)}{more}",
            file=sys.stderr,
            flush=True,
        )
    return headers, skipped


def _from_folder(settings: Mapping[str, Any], folder: Any, train: bool) -> Data:
    """The data of a streamed `--data` folder: the test patches cut now, one
    image at a time; the training patches by a Grain pipeline."""
    from ..pipeline import image_folder_dataset
    from ..pipeline._patches import fixed_patches
    from ..synthetic import with_input_noise

    headers, skipped = folder
    patch, noise = settings["patch"], settings["noise"]
    for h in headers:
        _check_size(h.path, (h.height, h.width), patch)
    train_headers, test_headers, how = held_out(headers)
    channels = max(h.channels for h in headers)
    train_seq, test_seq, noise_seq, step_seq = _streams(settings["seed"])
    with reported("--data: "):
        clean = fixed_patches(
            test_headers,
            settings["test_size"],
            size=patch,
            seed=test_seq,
            channels=channels,
        )
    train_ds: Any = {}
    if train:
        if settings["train_size"] < settings["batch_size"]:
            raise UsageError(
                f"--train-size {settings['train_size']} is smaller than --batch-size "
                f"{settings['batch_size']}: an epoch would not fill one batch; use "
                f"--train-size {settings['batch_size']} or more"
            )
        with reported("--data: "):
            train_ds = image_folder_dataset(
                [h.path for h in train_headers],
                patch_size=patch,
                batch_size=settings["batch_size"],
                patches_per_epoch=settings["train_size"],
                seed=int(train_seq.generate_state(1)[0]),
                augment=settings["augment"],
                workers=settings["workers"],
                on_error=settings["on_bad_image"],
                channels=channels,
            )
    workers = settings["workers"]
    streamed = (
        f"streamed by {workers} Grain worker process{'es' if workers != 1 else ''}"
        if workers
        else "streamed by Grain in this process"
    )
    skips = f"; {len(skipped)} unreadable skipped" if skipped else ""
    description = (
        f"{settings['data']} ({how}{skips}; "
        f"{'colour' if channels == 3 else 'grayscale'}; {streamed}), patches cut "
        f"afresh every epoch{', turned and flipped' if settings['augment'] else ''}"
        ", noise drawn afresh at every step"
    )
    step_seed = int(step_seq.generate_state(1)[0])
    return Data(
        train_ds,
        _test_set(clean, noise, noise_seq),
        channels,
        description,
        with_input_noise(noise, seed=step_seed),
    )


def _from_images(settings: Mapping[str, Any], train: bool) -> Data:
    from ..images import random_patches, read_images
    from ..synthetic import with_input_noise

    path, patch, noise = settings["data"], settings["patch"], settings["noise"]
    if settings.get("augment"):
        raise UsageError(
            "--augment turns the patches of a streamed --data FOLDER of several "
            f"images; {path} is read into memory: leave --augment out"
        )
    with reported("--data: "):
        images = read_images(path)
    train_images, test_images, how = split(images, patch)
    train_seq, test_seq, noise_seq, step_seq = _streams(settings["seed"])
    clean = random_patches(
        test_images, settings["test_size"], size=patch, seed=test_seq
    )
    test_ds = _test_set(clean, noise, noise_seq)
    train_ds = {}
    if train:
        patches = random_patches(
            train_images, settings["train_size"], size=patch, seed=train_seq
        )
        train_ds = {"image": patches, "label": patches}
    channels = int(clean.shape[-1])
    description = (
        f"{path} ({how}; {'colour' if channels == 3 else 'grayscale'}), noise "
        "drawn afresh at every step"
    )
    step_seed = int(step_seq.generate_state(1)[0])
    return Data(
        train_ds,
        test_ds,
        channels,
        description,
        with_input_noise(noise, seed=step_seed),
    )

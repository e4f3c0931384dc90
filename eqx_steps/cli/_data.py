"""The data of a run: synthetic phantoms, or patches of the user's own images.

- Without `--data`: [`eqx_steps.synthetic.make_denoising_data`][], a deterministic
    function of `--seed`, `--noise`, `--patch` and the set sizes (noise drawn
    once).
- With `--data PATH`: the images of PATH ([`eqx_steps.images.read_images`][]),
    split into training and test images, `--train-size` / `--test-size` random
    patches of each. The training set holds clean patches and the noise is drawn
    inside the training step ([`eqx_steps.synthetic.with_input_noise`][]): a new
    draw at every step, seeded, so every epoch sees new noise, and a resumed run
    draws what the uninterrupted one would have. The test patches get their noise
    once, seeded, so that every evaluation sees the same test set.

Either way `evaluate` rebuilds the same test set from the run's settings.
The images of `--data` are held in memory (float32) while the patches are cut,
then released: a folder of a few hundred photographs needs a few GB.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._errors import reported, UsageError


HOLDOUT = 5
"""One image in `HOLDOUT` is a test image (a single image: its bottom
`1/HOLDOUT`)."""


@dataclasses.dataclass(frozen=True)
class Data:
    """The datasets of a run and how to train on them."""

    train: dict[str, np.ndarray]  # empty when only the test set is needed
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
        from ._tasks import load_task_data

        return load_task_data(settings, train)
    if settings.get("data") is None:
        return _synthetic(settings, train)
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
        if min(im.shape[:2]) < patch:
            raise UsageError(
                f"image {name} is {im.shape[0]}x{im.shape[1]} pixels, smaller than "
                f"--patch {patch}; use --patch {min(im.shape[:2])} or less, or "
                "leave the image out"
            )
    arrays = [im for _, im in images]
    if len(arrays) > 1:
        test = [i for i in range(len(arrays)) if i % HOLDOUT == HOLDOUT - 1]
        test = test or [len(arrays) - 1]
        return (
            [im for i, im in enumerate(arrays) if i not in test],
            [arrays[i] for i in test],
            f"{len(arrays) - len(test)} training and {len(test)} held-out test images",
        )
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


def _from_images(settings: Mapping[str, Any], train: bool) -> Data:
    from ..images import random_patches, read_images
    from ..synthetic import with_input_noise

    path, patch, noise = settings["data"], settings["patch"], settings["noise"]
    with reported("--data: "):
        images = read_images(path)
    train_images, test_images, how = split(images, patch)
    # Independent streams: training patches, test patches, test noise, the noise
    # of the training steps.
    streams = np.random.SeedSequence(settings["seed"]).spawn(4)
    train_seq, test_seq, noise_seq, step_seq = streams
    clean = random_patches(
        test_images, settings["test_size"], size=patch, seed=test_seq
    )
    z = np.random.default_rng(noise_seq).standard_normal(clean.shape, np.float32)
    test_ds = {"image": clean + np.float32(noise) * z, "label": clean}
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

"""The measurements of the deblur and ct tasks: `A x + noise` of clean images.

The clean images are foam phantoms or patches of `--data`; the noise is drawn
once from the run's seed, so `evaluate` and `restore` rebuild the same test set.
`reference` turns measurements into the image shown beside the truth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._errors import reported, UsageError
from ._tasks import _image_shape, describe, make_operator


def measure(
    op: Any, images: np.ndarray, noise: float, seed: Any, chunk: int = 256
) -> np.ndarray:
    """`A x + noise * z` for channels-last images `x`, channels last; `z`
    standard normal from `seed` (an int or a `SeedSequence`)."""
    import jax
    import jax.numpy as jnp

    gray = len(op.input_shape) == 2
    x = images[..., 0] if gray else images
    fn = jax.jit(jax.vmap(op))
    y = np.concatenate(
        [np.asarray(fn(jnp.asarray(x[i : i + chunk]))) for i in range(0, len(x), chunk)]
    )
    if gray:
        y = y[..., None]
    z = np.random.default_rng(seed).standard_normal(y.shape, np.float32)
    return (y + np.float32(noise) * z).astype(np.float32)


def _clean_images(settings: Mapping[str, Any], train: bool, seqs: list) -> tuple:
    """Clean training and test images, and a description of where they come
    from."""
    from ..synthetic import make_foam

    patch = settings["patch"]
    if settings.get("data") is None:
        seed_train, seed_test = (int(s.generate_state(1)[0]) for s in seqs[:2])
        test = make_foam(settings["test_size"], size=patch, seed=seed_test)
        train_x = (
            make_foam(settings["train_size"], size=patch, seed=seed_train)
            if train
            else None
        )
        return train_x, test, "synthetic foam phantoms (SCICO's foam1-like)"
    from ..images import random_patches, read_images
    from ._data import split

    with reported("--data: "):
        images = read_images(settings["data"])
    train_images, test_images, how = split(images, patch)
    test = random_patches(test_images, settings["test_size"], size=patch, seed=seqs[1])
    train_x = (
        random_patches(train_images, settings["train_size"], size=patch, seed=seqs[0])
        if train
        else None
    )
    channels = test.shape[-1]
    if settings["task"] == "ct" and channels != 1:
        raise UsageError(
            f"--task ct reconstructs grayscale images, and --data "
            f"{settings['data']!r} holds colour images; give grayscale images"
        )
    colour = "colour" if channels == 3 else "grayscale"
    return train_x, test, f"{settings['data']} ({how}; {colour})"


def load_task_data(settings: Mapping[str, Any], train: bool) -> Any:
    """The datasets of a deblur or ct run: `{"image": A x + noise, "label": x}`.

    **Raises:**

    `UsageError` for a bad `--data`, or colour images for CT.
    """
    from ._data import Data

    # Independent streams: training images, test images, their noise.
    seqs = np.random.SeedSequence(settings["seed"]).spawn(4)
    train_x, test_x, where = _clean_images(settings, train, seqs)
    channels = int(test_x.shape[-1])
    op = make_operator(settings, _image_shape(settings["patch"], channels))
    noise = settings["noise"]
    test = {"image": measure(op, test_x, noise, seqs[3]), "label": test_x}
    train_ds = {}
    if train and train_x is not None:
        train_ds = {"image": measure(op, train_x, noise, seqs[2]), "label": train_x}
    what = "blurred" if settings["task"] == "deblur" else "projected"
    description = (
        f"{where}, {what} ({describe(settings)}), noise std {noise:g} drawn once"
    )
    return Data(train_ds, test, channels, description)


def reference(
    settings: Mapping[str, Any],
    measurements: np.ndarray,
    truth: np.ndarray | None = None,
) -> np.ndarray:
    """The measurement shown beside the truth and the output, as an image: the
    noisy or blurred image itself, or for CT the back-projection `A^T y`,
    scaled (least squares against `truth` when given, else to a maximum of 1)."""
    import jax
    import jax.numpy as jnp

    if settings.get("task", "denoise") != "ct":
        return measurements
    op = make_operator(settings, (settings["patch"], settings["patch"]))
    back = np.asarray(jax.jit(jax.vmap(op.adj))(jnp.asarray(measurements[..., 0])))
    back = back[..., None]
    if truth is not None:
        scale = float(np.sum(back * truth) / max(float(np.sum(back * back)), 1e-30))
    else:
        scale = 1.0 / max(float(np.max(back)), 1e-30)
    return (back * scale).astype(np.float32)

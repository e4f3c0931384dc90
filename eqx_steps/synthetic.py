"""Synthetic denoising data: random ellipse phantoms, noisy copies, fresh noise.

Nothing is downloaded; everything is generated from a seed with NumPy, fast
enough for tests, examples and the CLI demo (a few thousand 32x32 patches take
a fraction of a second). [`eqx_steps.synthetic.with_input_noise`][] instead draws
the noise inside the training step, anew at every step, for training on clean
images of one's own.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._validate import check_int, check_number, is_int, is_real
from .steps import train_step


# Each phantom: a background level, up to _MAX_ELLIPSES overlapping ellipses
# painted one over the other (piecewise-constant regions with sharp edges) and
# _NUM_BLOBS smooth Gaussian blobs added on top (slow intensity variations).
_MAX_ELLIPSES = 8
_NUM_BLOBS = 2
# Pixels rendered at once: bounds the temporary memory of large requests.
_CHUNK_PIXELS = 1 << 22


def _check_int(value, name: str, minimum: int) -> int:
    # ValueError for every bad value, as this module has always raised.
    if not is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_noise_std(noise_std) -> float:
    if not is_real(noise_std) or not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(
            f"`noise_std` must be a finite number >= 0, got {noise_std!r}."
        )
    return float(noise_std)


def _render(u: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Render phantoms from their uniform parameters `u` of shape (n, P)."""
    n = u.shape[0]
    k, b = _MAX_ELLIPSES, _NUM_BLOBS
    # Split the per-image uniform draws into named parameters.
    sections = np.cumsum([channels, 1, k, k, k, k, k, k * channels, b, b, b, b])
    (
        background,
        count,
        cy,
        cx,
        ay,
        ax,
        angle,
        level,
        by,
        bx,
        bwidth,
        bamp,
    ) = np.split(u, sections, axis=1)[:12]
    background = 0.3 * background  # (n, C) in [0, 0.3)
    count = 1 + np.floor(count[:, 0] * k)  # 1 .. k ellipses per image
    cy, cx = cy * size, cx * size  # centres anywhere in the patch
    ay = size * (0.05 + 0.35 * ay)  # semi-axes 5% .. 40% of the patch
    ax = size * (0.05 + 0.35 * ax)
    angle = np.pi * angle
    level = level.reshape(n, k, channels)  # intensities in [0, 1)
    by, bx = by * size, bx * size
    bwidth = size * (0.1 + 0.2 * bwidth)
    bamp = 0.4 * (bamp - 0.5)  # +-0.2

    grid = (np.arange(size, dtype=np.float32) + 0.5)[None, :]
    img = np.broadcast_to(background[:, None, None, :], (n, size, size, channels))
    img = img.astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    for i in range(k):
        dy = (grid - cy[:, i : i + 1])[:, :, None]  # (n, H, 1)
        dx = (grid - cx[:, i : i + 1])[:, None, :]  # (n, 1, W)
        c, s = cos[:, i, None, None], sin[:, i, None, None]
        r = ((c * dy + s * dx) / ay[:, i, None, None]) ** 2 + (
            (c * dx - s * dy) / ax[:, i, None, None]
        ) ** 2
        inside = (r <= 1.0) & (i < count)[:, None, None]
        img = np.where(inside[..., None], level[:, None, None, i, :], img)
    for j in range(b):
        dy2 = ((grid - by[:, j : j + 1]) ** 2)[:, :, None]
        dx2 = ((grid - bx[:, j : j + 1]) ** 2)[:, None, :]
        w2 = 2.0 * bwidth[:, j, None, None] ** 2
        blob = bamp[:, j, None, None] * np.exp(-(dy2 + dx2) / w2)
        img = img + blob[..., None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def make_phantoms(
    n: int, *, size: int = 32, channels: int = 1, seed: int = 0
) -> np.ndarray:
    """Clean synthetic phantoms: random overlapping ellipses on a background.

    Each image is rendered directly at `size x size`: a random background level,
    1 to 8 ellipses (random centre, semi-axes 5% to 40% of the size, rotation and
    intensity per channel) painted one over the other, and two faint smooth
    Gaussian blobs added on top, clipped to `[0, 1]`. Piecewise-constant regions
    with sharp edges plus slow variations: what a denoiser has to preserve.

    Image `i` depends only on `seed`, `size`, `channels` and `i`, so a larger
    `n` extends a smaller one (prefix-stable).

    **Arguments:**

    - `n`: the number of images (at least 1).
    - `size`: the height and width of each image (at least 1).
    - `channels`: the number of channels (at least 1).
    - `seed`: a non-negative integer seed.

    **Returns:**

    A `float32` NumPy array of shape `(n, size, size, channels)`, values in
    `[0, 1]`.
    """
    n = _check_int(n, "n", 1)
    size = _check_int(size, "size", 1)
    channels = _check_int(channels, "channels", 1)
    seed = _check_int(seed, "seed", 0)
    return _phantoms(n, size, channels, np.random.SeedSequence(seed))


def _phantoms(
    n: int, size: int, channels: int, seed_seq: np.random.SeedSequence
) -> np.ndarray:
    num_params = channels + 1 + _MAX_ELLIPSES * (5 + channels) + 4 * _NUM_BLOBS
    # Row-major draws: image i's parameters are the i-th row whatever n is.
    u = np.random.default_rng(seed_seq).random((n, num_params), dtype=np.float32)
    chunk = max(1, _CHUNK_PIXELS // (size * size * channels))
    return np.concatenate(
        [_render(u[i : i + chunk], size, channels) for i in range(0, n, chunk)]
    )


def make_denoising_data(
    n_train: int,
    n_test: int,
    *,
    size: int = 32,
    channels: int = 1,
    noise_std: float = 0.1,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Synthetic training and test sets for denoising, in SCICO's format.

    Clean images are phantoms of random overlapping ellipses (see
    `make_phantoms`), rendered directly at the patch size; the inputs are the
    clean images plus white Gaussian noise of standard deviation `noise_std`
    (not clipped, so the noise is exactly Gaussian).

    The data are a deterministic function of the arguments. The training and
    test sets come from independent streams spawned from `seed` (one for the
    training phantoms, one for their noise, likewise for the test set), so they
    are different images, the test set does not depend on `n_train`, and each
    set is prefix-stable in its size.

    **Arguments:**

    - `n_train`: the number of training examples (at least 1).
    - `n_test`: the number of test examples (at least 1).
    - `size`: the patch height and width (at least 1).
    - `channels`: the number of channels (at least 1).
    - `noise_std`: the standard deviation of the additive noise (>= 0).
    - `seed`: a non-negative integer seed.

    **Returns:**

    `(train_ds, test_ds)`: dicts `{"image": noisy, "label": clean}` of `float32`
    NumPy arrays of shape `(N, size, size, channels)`, as SCICO's
    `DataSetDict`.

    !!! example

        ```python
        train_ds, test_ds = make_denoising_data(2048, 256, size=32, noise_std=0.1)
        train_ds["image"].shape  # (2048, 32, 32, 1)
        ```
    """
    n_train = _check_int(n_train, "n_train", 1)
    n_test = _check_int(n_test, "n_test", 1)
    size = _check_int(size, "size", 1)
    channels = _check_int(channels, "channels", 1)
    noise_std = _check_noise_std(noise_std)
    seed = _check_int(seed, "seed", 0)

    train_clean, train_noise, test_clean, test_noise = np.random.SeedSequence(
        seed
    ).spawn(4)

    def dataset(n, clean_seq, noise_seq):
        clean = _phantoms(n, size, channels, clean_seq)
        noise = np.random.default_rng(noise_seq).standard_normal(
            clean.shape, dtype=np.float32
        )
        noisy = clean + np.float32(noise_std) * noise
        return {"image": noisy.astype(np.float32), "label": clean}

    return (
        dataset(n_train, train_clean, train_noise),
        dataset(n_test, test_clean, test_noise),
    )


def with_input_noise(
    noise_std: float,
    *,
    seed: int = 0,
    train_step_fn: Callable[..., tuple[Any, dict]] = train_step,
) -> Callable[..., tuple[Any, dict]]:
    """A training step that adds fresh Gaussian noise to the clean targets.

    The returned function has the signature of [`eqx_steps.train_step`][] and
    can be passed as `train_step_fn` (to `parallel_train_step`, or as
    `config["train_step_fn"]` to `BasicTrainer`). It replaces `batch["image"]` by
    `batch["label"] + noise_std * z`, `z` standard normal, and calls
    `train_step_fn`. The noise is drawn from a key derived from `seed`, the
    state's `step` and the device's index along `axis_name`: a new draw at every
    step (so each epoch sees each clean patch with new noise), different on every
    device and example, and the same again when a run is resumed from a
    checkpoint. The dataset then holds clean images only (`"image"` can be the
    same array as `"label"`).

    **Arguments:**

    - `noise_std`: the standard deviation of the noise (>= 0).
    - `seed`: a non-negative integer seed of the noise.
    - `train_step_fn`: the step to run on the noisy batch (default
        [`eqx_steps.train_step`][]).

    **Returns:**

    The step `(state, batch, learning_rate_fn, criterion, metrics_fn, *,
    axis_name="device") -> (state, metrics)`.

    !!! example

        ```python
        step = with_input_noise(0.1, seed=0)
        train = es.parallel_train_step(lr, es.mse_loss, es.compute_metrics,
                                       train_step_fn=step)
        state, metrics = train(state, {"image": clean, "label": clean})
        ```
    """
    std = check_number("noise_std", noise_std, minimum=0)
    seed = check_int("seed", seed, minimum=0)

    def noisy_step(
        state, batch, learning_rate_fn, criterion, metrics_fn, *, axis_name="device"
    ):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        clean = batch["label"]
        noise = jax.random.normal(key, clean.shape, clean.dtype)
        batch = {**batch, "image": clean + std * noise}
        return train_step_fn(
            state,
            batch,
            learning_rate_fn,
            criterion,
            metrics_fn,
            axis_name=axis_name,
        )

    return noisy_step


# SCICO's foam phantoms (xdesign's `Foam(size_range=[0.075, 0.0025], gap=1e-3)`):
# a disk of radius 0.5 (the image's inscribed circle) with up to this many
# non-overlapping round pores sprinkled in it, largest first.
_FOAM_PORES = 300
_FOAM_RADII = (0.0025, 0.075)  # pore radii, in units of the image width
_FOAM_GAP = 1e-3


def _foam_pores(rngs: list[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
    """The pores of one foam per generator: centres `(n, P, 2)` and radii
    `(n, P)`, a radius 0 for a pore not kept."""
    k = _FOAM_PORES
    lo, hi = _FOAM_RADII
    u = np.stack([rng.random((3, k), dtype=np.float32) for rng in rngs])
    radii = np.sort(lo + (hi - lo) * u[:, 0], axis=1)[:, ::-1]
    # Centres uniform in the disk that keeps each pore inside the foam.
    rho = (0.5 - radii - _FOAM_GAP) * np.sqrt(u[:, 1])
    theta = 2 * np.pi * u[:, 2]
    centres = np.stack([rho * np.cos(theta), rho * np.sin(theta)], axis=-1)
    sq = np.sum(centres**2, axis=-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2 * centres @ centres.transpose(0, 2, 1)
    overlap = d2 < (radii[:, :, None] + radii[:, None, :] + _FOAM_GAP) ** 2
    overlap = np.ascontiguousarray(overlap.transpose(1, 0, 2))  # (k, n, k)
    kept = np.zeros(radii.shape, dtype=bool)
    for j in range(k):  # greedy: a pore is kept when it overlaps no kept pore
        kept[:, j] = ~np.any(overlap[j, :, :j] & kept[:, :j], axis=1)
    return centres, np.where(kept, radii, 0.0)


def _render_foam(centres: np.ndarray, radii: np.ndarray, size: int) -> np.ndarray:
    """Foams `(n, size, size)` from their pores, edges anti-aliased."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    py, px = grid[None, :, None], grid[None, None, :]
    pixel = np.float32(1.0 / size)  # a pixel, in units of the image width
    r = np.sqrt(py**2 + px**2)
    image = np.clip((0.5 - r) / pixel + 0.5, 0, 1)  # the disk
    image = np.repeat(image, len(radii), axis=0).astype(np.float32)
    for j in np.flatnonzero(np.any(radii > 0, axis=0)):
        cy = centres[:, j, 0, None, None].astype(np.float32)
        cx = centres[:, j, 1, None, None].astype(np.float32)
        rad = radii[:, j, None, None].astype(np.float32)
        d = np.sqrt((py - cy) ** 2 + (px - cx) ** 2)
        hole = np.where(rad > 0, np.clip((d - rad) / pixel + 0.5, 0, 1), 1)
        np.minimum(image, hole, out=image)
    return image


def make_foam(n: int, *, size: int = 32, seed: int = 0) -> np.ndarray:
    """Foam phantoms like SCICO's deblurring examples' (`foam1`): unions of disks.

    Each image is a bright disk (value 1) filling the image's inscribed circle,
    pierced by up to 300 non-overlapping round pores (value 0) of radii 0.25% to
    7.5% of the image width, sprinkled largest first, as xdesign's
    `Foam(size_range=[0.075, 0.0025], gap=1e-3, porosity=1)` that SCICO's
    `generate_foam1_images` draws (a re-implementation with NumPy; not the same
    random numbers). Edges are anti-aliased (each pixel's value is about the
    fraction of it inside the foam). Values in `[0, 1]`.

    Image `i` depends only on `seed`, `size` and `i` (prefix-stable in `n`).

    **Arguments:**

    - `n`: the number of images (at least 1).
    - `size`: the height and width of each image (at least 1).
    - `seed`: a non-negative integer seed.

    **Returns:**

    A `float32` NumPy array of shape `(n, size, size, 1)`.

    !!! example

        ```python
        x = make_foam(16, size=64, seed=0)  # (16, 64, 64, 1)
        ```
    """
    n = _check_int(n, "n", 1)
    size = _check_int(size, "size", 1)
    seed = _check_int(seed, "seed", 0)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]
    chunk = max(1, min(256, _CHUNK_PIXELS // (size * size * 8)))
    parts = []
    for i in range(0, n, chunk):
        centres, radii = _foam_pores(rngs[i : i + chunk])
        parts.append(_render_foam(centres, radii, size))
    return np.concatenate(parts)[..., None]

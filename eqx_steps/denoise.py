"""Denoising whole images with a denoiser model, tile by tile.

`denoise_image` applies a denoiser (a bundled `DnCNN`, SCICO's pretrained weights
from `eqx_steps.models.load_scico_dncnn`, or a model trained with this library)
to a grayscale or colour image of any size: the image is cut into overlapping
tiles so that only one tile's activations are ever on the device, and the tiles'
centres are put back together. `add_noise` makes a seeded noisy test image;
`eqx_steps.snr` scores the results.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, PyTree

from ._forward import per_example
from ._validate import check_int, check_number
from .models import DnCNN
from .platform import default_backend_jit


_DEFAULT_OVERLAP = 32
"""The tile overlap for a model whose receptive field is not known."""


def _as_image(image: ArrayLike) -> np.ndarray:
    """`image` as a real floating NumPy array of shape `(H, W)` or `(H, W, C)`."""
    array = np.asarray(image)
    if array.dtype.kind != "f":
        raise TypeError(
            f"`image` must be a real floating-point array with values in [0, 1], got "
            f"dtype {array.dtype}; convert it, e.g. `image.astype(np.float32) / 255` "
            "for 8-bit pixels."
        )
    if array.ndim not in (2, 3) or 0 in array.shape:
        raise ValueError(
            "`image` must have shape (height, width) or (height, width, channels), "
            f"got {array.shape}."
        )
    return array


def add_noise(
    image: Float[ArrayLike, "height width *channels"], sigma: float, seed: int = 0
) -> Float[np.ndarray, "height width *channels"]:
    """`image` plus white Gaussian noise of standard deviation `sigma`.

    The noise is drawn with `jax.random` from `jax.random.key(seed)`, so the same
    seed gives the same noisy image on every machine.

    **Arguments:**

    - `image`: a floating-point image of shape `(height, width)` or
        `(height, width, channels)`, values in `[0, 1]` for SCICO's denoisers.
    - `sigma`: the noise's standard deviation (`>= 0`).
    - `seed`: the seed of the noise (an int `>= 0`).

    **Returns:**

    The noisy image, a NumPy array of the shape and dtype of `image`.
    """
    array = _as_image(image)
    sigma = check_number("sigma", sigma, minimum=0)
    seed = check_int("seed", seed, minimum=0)
    noise = jax.random.normal(jax.random.key(seed), array.shape, jnp.float32)
    return (array + sigma * np.asarray(noise)).astype(array.dtype)


def _receptive_radius(model: PyTree) -> int:
    """How far (in pixels) an output pixel of `model` sees: exact for a DnCNN
    (`depth` convolutions of radius `k // 2`), `_DEFAULT_OVERLAP` otherwise."""
    if isinstance(model, DnCNN):
        return model.depth * (max(model.conv_start.kernel_size) // 2)
    return _DEFAULT_OVERLAP


def _model_inputs(
    image: np.ndarray, channels: int, sigma: float | None
) -> tuple[list[np.ndarray], slice]:
    """The `(H, W, channels)` arrays to denoise, and which output channels to keep.

    The whole image when the model takes its channels; otherwise each channel on
    its own (SCICO's denoiser), with a constant noise-level plane when `sigma` is
    given (SCICO's "6N"/"17N" convention: input `[x, sigma]`, output channel 0).
    """
    planes = image[..., None] if image.ndim == 2 else image
    n = planes.shape[-1]
    if sigma is not None:
        if channels != 2:
            raise ValueError(
                f"`sigma` = {sigma!r} is given but the model takes {channels} "
                "channel(s); a noise-level model takes 2 (the image and a plane of "
                "the noise level, as SCICO's 6N): leave `sigma` out for this model."
            )
        level = np.full(planes.shape[:2], sigma, planes.dtype)
        return [np.stack([planes[..., c], level], -1) for c in range(n)], slice(0, 1)
    if channels == n:
        return [planes], slice(None)
    if channels == 1:
        return [planes[..., c : c + 1] for c in range(n)], slice(None)
    hint = " or give `sigma` (a noise-level model)" if channels == 2 else ""
    raise ValueError(
        f"The model takes {channels} channels but `image` has {n} (shape "
        f"{image.shape}); give an image with {channels} channels{hint}."
    )


def _axis_tiles(
    size: int, tile: int | None, overlap: int
) -> tuple[int, int, list[int]]:
    """How one axis of `size` pixels is tiled: `(pad, window, starts)`.

    The axis is padded circularly by `pad` on each side; the windows
    `padded[s : s + window]` for `s` in `starts` have centres
    `[s, s + window - 2 * pad)` in the image's coordinates, which cover the axis
    (the last one ends at the edge, overlapping its neighbour if need be). An
    axis no longer than `tile` is one window, the whole axis, unpadded.
    """
    if tile is None or size <= tile:
        return 0, size, [0]
    return overlap, tile + 2 * overlap, [*range(0, size - tile, tile), size - tile]


def _tiled(
    apply: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    tile: int | None,
    overlap: int,
) -> np.ndarray:
    """`apply` (same-shape, translation-equivariant, circular) over tiles of `x`."""
    (ph, wh, rows), (pw, ww, cols) = (
        _axis_tiles(n, tile, overlap) for n in x.shape[:2]
    )
    padded = np.pad(x, ((ph, ph), (pw, pw), (0, 0)), mode="wrap")
    out = None
    for i in rows:
        for j in cols:
            y = apply(padded[i : i + wh, j : j + ww])
            if out is None:
                out = np.empty(x.shape[:2] + y.shape[2:], y.dtype)
            out[i : i + wh - 2 * ph, j : j + ww - 2 * pw] = y[
                ph : wh - ph, pw : ww - pw
            ]
    assert out is not None
    return out


@default_backend_jit  # eqx.filter_jit, with the fast XLA:CPU options
def _apply_one(forward, model, model_state, x):
    y, _ = forward(model, model_state, x[None], inference=True)
    return y[0]


def _model_dtype(model: PyTree):
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    return leaves[0].dtype if leaves else jnp.float32


def denoise_image(
    model: PyTree,
    model_state: eqx.nn.State | None,
    image: Float[ArrayLike, "height width *channels"],
    *,
    sigma: float | None = None,
    tile: int | None = 512,
    overlap: int | None = None,
    forward: Callable = per_example,
    progress: Callable[[int, int], object] | None = None,
) -> Float[np.ndarray, "height width *channels"]:
    """Denoise a grayscale or colour image with a denoiser model, tile by tile.

    The model runs in inference mode (`eqx.nn.inference_mode`) on one
    `(height, width, model.channels)` example at a time. A colour image is
    denoised whole when the model takes its number of channels, else each channel
    on its own (how SCICO's `DnCNN` denoiser handles colour: all its models take
    one channel). With `sigma`, the model is a noise-level model (SCICO's "6N"):
    each channel is given with a constant plane of value `sigma`, and the first
    output channel is the denoised one.

    An image larger than `tile` along an axis is cut along it into tiles of
    `tile` pixels, each extended by `overlap` pixels of context on both sides
    (taken circularly at the image's edges, as the models' circular padding
    does); only the tiles' centres are kept. Only one tile's activations are on
    the device at a time, so memory stays bounded whatever the image size; when
    `overlap` is at least the model's receptive-field radius (the default for a
    `DnCNN`: its depth, for 3x3 kernels), the result equals the untiled one up to
    floating-point rounding. All tiles have the same shape, so the model is
    compiled once.

    Unlike SCICO's `DnCNN`, which denoises each colour channel transposed (it
    swaps the first and last axes of an `(H, W, C)` image), the channels are
    denoised as they are; grayscale results are the same.

    !!! example

        ```python
        model, state = eqx_steps.models.load_scico_dncnn("6M")
        noisy = add_noise(clean, 0.1, seed=0)
        denoised = denoise_image(model, state, noisy)
        print(eqx_steps.snr(clean, noisy), eqx_steps.snr(clean, denoised))
        ```

    **Arguments:**

    - `model`: the denoiser, an Equinox model taking one `(height, width,
        channels)` example (and `model_state`) with an int attribute `channels`,
        as the bundled models have.
    - `model_state`: its `eqx.nn.State` (batch-norm statistics), or `None` for a
        stateless model.
    - `image`: a real floating-point image `(height, width)` or `(height, width,
        channels)`, values in `[0, 1]` for SCICO's pretrained models.
    - `sigma`: the noise standard deviation, for a noise-level model only.
    - `tile`: the size of the tiles' centres in pixels, or `None` to denoise the
        image in one piece.
    - `overlap`: the context added on each side of a tile; `None` (default): the
        receptive-field radius for a `DnCNN`, 32 pixels for other models.
    - `forward`: how the model is applied to a batch, as `TrainState.forward`
        (default [`eqx_steps.per_example`][]).
    - `progress`: called as `progress(done, total)` after each tile (e.g. to move
        a progress bar), or `None`.

    **Returns:**

    The denoised image, a NumPy array of the shape of `image` in the model's
    floating dtype.
    """
    array = _as_image(image)
    channels = getattr(model, "channels", None)
    if not isinstance(channels, int) or isinstance(channels, bool):
        raise TypeError(
            f"`model` must have an int attribute `channels` (its input channels), as "
            f"the bundled models have; {type(model).__name__} has {channels!r}."
        )
    if sigma is not None:
        sigma = check_number("sigma", sigma, minimum=0)
    if tile is not None:
        tile = check_int("tile", tile, minimum=1)
    if overlap is None:
        overlap = _receptive_radius(model)
    overlap = check_int("overlap", overlap, minimum=0)
    inputs, keep = _model_inputs(array.astype(_model_dtype(model)), channels, sigma)

    total = len(inputs) * math.prod(
        len(_axis_tiles(n, tile, overlap)[2]) for n in array.shape[:2]
    )
    done = 0

    def apply(window: np.ndarray) -> np.ndarray:
        nonlocal done
        y = np.asarray(_apply_one(forward, model, model_state, jnp.asarray(window)))
        done += 1
        if progress is not None:
            progress(done, total)
        return y[..., keep]

    out = np.concatenate([_tiled(apply, x, tile, overlap) for x in inputs], -1)
    return out.reshape(array.shape)

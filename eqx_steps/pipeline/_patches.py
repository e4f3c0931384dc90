"""Patches cut from one decoded image, their random turns and flips, and the
fixed patches of a test set, decoded one image at a time."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

from ..images import (
    _check_float_range,
    _patch_plan,
    _read_pixels,
    _to_unit_range,
)
from ._headers import channels_of, check_sizes, ImageHeader


def cut_patches(
    header: ImageHeader,
    channels: int,
    ys: np.ndarray,
    xs: np.ndarray,
    size: int,
    on_error: str,
) -> np.ndarray:
    """Decode one image and cut the patches with corners `(ys, xs)`: float32
    `(n, size, size, channels)` in [0, 1] (no patches when it cannot be read
    and `on_error` is "skip")."""
    name = repr(header.path)
    try:
        pixels = _read_pixels(header.path)
        if pixels.shape[:2] != (header.height, header.width):
            raise ValueError(
                f"cannot read image {header.path!r}: its pixels are "
                f"{pixels.shape[0]}x{pixels.shape[1]}, its header said "
                f"{header.height}x{header.width}"
            )
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        _check_float_range(pixels, name)
        out = np.empty((len(ys), size, size, channels), np.float32)
        for k, (y, x) in enumerate(zip(ys, xs)):
            out[k] = _to_unit_range(pixels[y : y + size, x : x + size], name)
    except (ValueError, OSError) as e:
        if on_error == "raise":
            raise ValueError(
                f"{e} (pass on_error='skip' to leave such images out)"
            ) from None
        warnings.warn(f"skipped an unreadable image: {e}", stacklevel=2)
        return np.zeros((0, size, size, channels), np.float32)
    return out


def augment_patches(patches: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each patch turned by a random element of the square's symmetry group: a
    rotation by 0, 90, 180 or 270 degrees, then a horizontal flip or not."""
    turns = rng.integers(4, size=len(patches))
    flips = rng.integers(2, size=len(patches))
    for k in range(len(patches)):
        p = np.rot90(patches[k], int(turns[k]), axes=(0, 1))
        patches[k] = p[:, ::-1] if flips[k] else p
    return patches


def fixed_patches(
    headers: Sequence[ImageHeader],
    n: int,
    *,
    size: int,
    seed: int | np.random.SeedSequence,
    channels: int | None = None,
) -> Float[np.ndarray, "n size size C"]:
    """The patches `random_patches(read_images(...), n, size=size, seed=seed)`
    gives, decoding one image at a time (a test set of a large folder).

    An unreadable image raises a `ValueError` naming it.
    """
    check_sizes(headers, size)
    which, ys, xs = _patch_plan([(h.height, h.width) for h in headers], n, size, seed)
    channels = channels_of(headers, channels)
    out = np.empty((n, size, size, channels), np.float32)
    for j, h in enumerate(headers):
        (slots,) = np.nonzero(which == j)
        if len(slots):
            out[slots] = cut_patches(h, channels, ys[slots], xs[slots], size, "raise")
    return out

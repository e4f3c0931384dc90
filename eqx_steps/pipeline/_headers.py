"""The headers of a folder of images: what `image_folder_dataset` plans its
patches from, read without decoding the pixels."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from typing import Literal

from ..images import (
    _AS_GRAY,
    _AS_RGB,
    _folder_files,
)


ON_ERROR = ("skip", "raise")
"""What to do with an image that cannot be read: skip it (with one warning,
counted in `skipped`) or raise a `ValueError` naming it."""


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: enough to plan its patches."""

    path: str
    height: int
    width: int
    channels: int  # as read_image returns it: 1 or 3


def _header(path: str) -> ImageHeader:
    """The header of `path`; `ValueError` naming it when it is not an image
    `read_image` reads (e.g. 4 channels that are not RGBA)."""
    from PIL import Image as PILImage, UnidentifiedImageError

    try:
        with PILImage.open(path) as im:
            mode, (width, height) = im.mode, im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None
    read_as = "RGB" if mode in _AS_RGB else "L" if mode in _AS_GRAY else mode
    bands = PILImage.getmodebands(read_as)
    if bands not in (1, 3):
        raise ValueError(
            f"cannot read image {path!r}: mode {mode} ({bands} channels) is not a "
            "grayscale or colour image"
        )
    return ImageHeader(path, height, width, bands)


def _skip_warning(skipped: list[tuple[str, str]]) -> None:
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    warnings.warn(
        f"skipped {len(skipped)} unreadable image(s): {skipped[0][1]}{more}; pass "
        "on_error='raise' to stop at the first one instead",
        stacklevel=3,
    )


def scan_images(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    on_error: Literal["skip", "raise"] = "skip",
) -> tuple[list[ImageHeader], list[tuple[str, str]]]:
    """The headers of a folder's image files (or of the given files), in name
    order, and the files skipped as unreadable with the reason.

    **Raises:**

    `FileNotFoundError` for a missing folder; `ValueError` for a folder without
    image files, for no readable image, or (with `on_error="raise"`) naming the
    first unreadable file.
    """
    if on_error not in ON_ERROR:
        raise ValueError(
            f"`on_error` must be one of {ON_ERROR}, got {on_error!r}: 'skip' skips "
            "an unreadable image with a warning, 'raise' stops at it."
        )
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{path!r} is not a folder; give a folder of image files "
                "(PNG/JPEG/TIFF), or a list of image files."
            )
        files = _folder_files(path)
    else:
        files = [os.fspath(f) for f in source]
        if not files:
            raise ValueError("the list of image files is empty; give at least one.")
    headers, skipped = [], []
    for f in files:
        try:
            headers.append(_header(f))
        except (ValueError, OSError) as e:
            if on_error == "raise":
                raise ValueError(
                    f"{e} (pass on_error='skip' to leave such images out)"
                ) from None
            skipped.append((f, str(e)))
    if not headers:
        raise ValueError(
            f"none of the {len(files)} image files can be read; the first: "
            f"{skipped[0][1]}"
        )
    if skipped:
        _skip_warning(skipped)
    return headers, skipped


def check_sizes(headers: Sequence[ImageHeader], patch_size: int) -> None:
    for h in headers:
        if min(h.height, h.width) < patch_size:
            raise ValueError(
                f"image {h.path!r} is {h.height}x{h.width} pixels, smaller than "
                f"`patch_size` {patch_size}; use a patch size of at most "
                f"{min(h.height, h.width)}, or leave the image out."
            )


def channels_of(headers: Sequence[ImageHeader], channels: int | None) -> int:
    least = max(h.channels for h in headers)
    if channels is None:
        return least
    if channels not in (1, 3) or channels < least:
        raise ValueError(
            f"`channels` must be 1 or 3, and 3 when an image is in colour, got "
            f"{channels!r}; leave it out to follow the images."
        )
    return channels

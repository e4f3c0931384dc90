"""Image files in and out, and random patches for training on one's own images.

Images are NumPy `float32` arrays of shape `(H, W, C)`, channels-last as
everywhere in `eqx_steps`, with values in `[0, 1]` for files (8-bit values are
divided by 255, 16-bit ones by 65535). Pillow reads and writes the files.

```python
images = read_images("photos/")  # a folder of PNG/JPEG/TIFF files
patches = random_patches([im for _, im in images], 1024, size=32, seed=0)
write_image("out.png", patches[0])
```
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

from ._io import atomic_write
from ._validate import check_int


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""The file name endings [`eqx_steps.images.read_images`][] reads in a folder."""

_ARRAY_SUFFIXES = (".npy", ".npz")
_ARRAY_KEY = "images"  # the array read from an .npz holding several

Image = Float[np.ndarray, "H W C"]


def _to_unit_range(array: np.ndarray, name: str) -> Image:
    """Pixel values as float32 in [0, 1] (integers scaled by their type's range)."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit files (PNG/TIFF) arrive as uint16 or, from some modes, int32.
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(
                f"{name}: integer pixel values outside [0, 65535] "
                f"({array.min()}..{array.max()}); give 8- or 16-bit images, or floats "
                "in [0, 1]."
            )
        return array.astype(np.float32) / 65535
    if np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32)
        if not np.all(np.isfinite(out)):
            raise ValueError(f"{name}: holds non-finite pixel values (nan or inf).")
        return out
    raise ValueError(f"{name}: pixels of dtype {array.dtype} are not an image.")


# A floating-point image file is taken as it is when its values lie within
# [-0.5, 1.5] (a noisy [0, 1] image crosses the bounds a little); beyond that it
# is in other units, and taking it as [0, 1] would turn it white or black.
_FLOAT_RANGE = (-0.5, 1.5)


def _check_float_range(array: np.ndarray, name: str) -> None:
    """Refuse a floating-point image whose values are clearly not in [0, 1]."""
    if not (array.size and np.issubdtype(array.dtype, np.floating)):
        return
    lo, hi = float(array.min()), float(array.max())
    if lo < _FLOAT_RANGE[0] or hi > _FLOAT_RANGE[1]:
        raise ValueError(
            f"{name}: floating-point pixel values {lo:g}..{hi:g} are not in [0, 1] "
            "(this library's pixel scale), so the image would come out white or "
            "black; rescale it to [0, 1] first, e.g. `(x - x.min()) / (x.max() - "
            "x.min())`, or save it as an 8- or 16-bit image."
        )


def has_alpha(path: str | os.PathLike) -> bool:
    """Whether an image file has an alpha (transparency) channel, which
    [`eqx_steps.images.read_image`][] drops.

    **Arguments:**

    - `path`: an image file (only its header is read).

    **Returns:**

    `True` for an RGBA, LA or PA image, or a palette image with transparency.
    """
    from PIL import Image as PILImage

    with PILImage.open(os.fspath(path)) as im:
        return "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)


def _with_channels(array: np.ndarray, name: str) -> np.ndarray:
    """`(H, W)` -> `(H, W, 1)`; `(H, W, C)` kept; anything else refused."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and array.shape[-1] in (1, 3):
        return array
    raise ValueError(
        f"{name}: shape {array.shape} is not an image; expected (H, W), (H, W, 1) "
        "or (H, W, 3)."
    )


def read_image(path: str | os.PathLike) -> Image:
    """Read one image file as a float32 `(H, W, C)` array in `[0, 1]`.

    Grayscale files give `C = 1`, colour files `C = 3` (an alpha channel is
    dropped, see [`eqx_steps.images.has_alpha`][]; a palette expanded to RGB).
    8-bit values are divided by 255, 16-bit ones by 65535; floating-point files
    (e.g. 32-bit TIFF) are taken as they are, and refused when their values are
    clearly not in `[0, 1]` (below -0.5 or above 1.5).

    **Arguments:**

    - `path`: a PNG, JPEG or TIFF file (any format Pillow reads).

    **Returns:**

    The image, `float32`, shape `(H, W, 1)` or `(H, W, 3)`.

    **Raises:**

    `FileNotFoundError` if `path` does not exist, `ValueError` naming the file if
    it cannot be decoded as an image or holds floating-point values far outside
    `[0, 1]` (naming their range).
    """
    name = os.fspath(path)
    image = _with_channels(_to_unit_range(_read_pixels(name), repr(name)), repr(name))
    _check_float_range(image, repr(name))
    return image


# Pillow modes read as RGB (an alpha channel dropped, a palette expanded), and as
# grayscale; other modes are read as they are.
_AS_RGB = ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")
_AS_GRAY = ("LA",)


def _read_pixels(name: str) -> np.ndarray:
    """The pixels of an image file in their stored dtype (`uint8`, `uint16`,
    `int32`, `float32`, ...), `(H, W)` or `(H, W, 3)`: what `read_image` scales."""
    from PIL import Image as PILImage, UnidentifiedImageError

    try:
        with PILImage.open(name) as im:
            im.load()
            if im.mode in _AS_RGB:
                im = im.convert("RGB")
            elif im.mode in _AS_GRAY:
                im = im.convert("L")
            return np.asarray(im)
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {name!r}: {e}") from None


def _array_images(path: str) -> list[tuple[str, Image]]:
    """The images of an `.npy`/`.npz` array: `(H, W)`, `(H, W, C)`, `(N, H, W)`,
    `(N, H, W, C)`."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read array file {path!r}: {e}") from None
    if isinstance(loaded, np.ndarray):
        array = loaded
    else:  # an .npz archive
        with loaded:
            keys = list(loaded.keys())
            if len(keys) != 1 and _ARRAY_KEY not in keys:
                raise ValueError(
                    f"{path!r} holds arrays {keys}; store one array, or name the "
                    f"images {_ARRAY_KEY!r}."
                )
            array = loaded[keys[0] if len(keys) == 1 else _ARRAY_KEY]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3)):
        array = array[None]
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or not len(array):
        raise ValueError(
            f"{path!r}: array of shape {array.shape} is not a stack of images; "
            "expected (H, W), (H, W, C), (N, H, W) or (N, H, W, C) with C = 1 or 3."
        )
    images = _to_unit_range(array, repr(path))
    return [(f"{path}[{i}]", image) for i, image in enumerate(images)]


def _folder_files(path: str) -> list[str]:
    names = sorted(os.listdir(path))
    files = [
        os.path.join(path, n)
        for n in names
        if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")
    ]
    if not files:
        others = [n for n in names if not n.startswith(".")]
        also = (
            f"; it has {len(others)} other entries, e.g. {others[0]!r}"
            if others
            else ""
        )
        raise ValueError(
            f"folder {path!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}){also}."
        )
    return files


def _common_channels(images: list[tuple[str, Image]]) -> list[tuple[str, Image]]:
    """Grayscale images repeated to RGB when any image of the set is in colour."""
    if all(im.shape[-1] == 1 for _, im in images):
        return images
    return [
        (n, np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im) for n, im in images
    ]


def read_images(path: str | os.PathLike) -> list[tuple[str, Image]]:
    """Read a set of images: a folder of image files, one image file, or an array.

    - A folder: every file in it (not its subfolders) whose name ends in one of
        [`eqx_steps.images.IMAGE_SUFFIXES`][] (PNG, JPEG, TIFF), in name order;
        other files are ignored.
    - One image file, read by [`eqx_steps.images.read_image`][].
    - An `.npy` or `.npz` file: one array of shape `(H, W)`, `(H, W, C)`,
        `(N, H, W)` or `(N, H, W, C)` with `C` 1 or 3 (an `.npz` holds one array,
        or names it `"images"`); `uint8` values are divided by 255, floats are
        taken as they are (`[0, 1]` expected).

    When some images are in colour and others grayscale, the grayscale ones are
    repeated to three channels, so that every image has the same channel count.

    **Arguments:**

    - `path`: the folder or file.

    **Returns:**

    A list of `(name, image)`: the file name (or `"file[i]"` for an array) and the
    float32 `(H, W, C)` image.

    **Raises:**

    `FileNotFoundError` if `path` does not exist; `ValueError`, naming the file,
    for an empty folder, a file that is not an image or an array of the wrong
    shape.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} does not exist; give a folder of images, "
            "an image file or an .npy/.npz array."
        )
    if os.path.isdir(path):
        images = [(f, read_image(f)) for f in _folder_files(path)]
    elif path.lower().endswith(_ARRAY_SUFFIXES):
        images = _array_images(path)
    else:
        images = [(path, read_image(path))]
    return _common_channels(images)


def random_patches(
    images: Sequence[Image],
    n: int,
    *,
    size: int,
    seed: int | np.random.SeedSequence = 0,
) -> Float[np.ndarray, "n size size C"]:
    """`n` square patches cut at random positions from `images`.

    Every position of every image is equally likely: an image is drawn with a
    probability proportional to its number of patch positions, then a position in
    it uniformly. The patches are a deterministic function of the arguments.

    **Arguments:**

    - `images`: `(H, W, C)` arrays with the same `C`, each at least `size` high
        and wide.
    - `n`: the number of patches (at least 1).
    - `size`: the patch height and width (at least 1).
    - `seed`: an integer seed, or a `np.random.SeedSequence`.

    **Returns:**

    A float32 array of shape `(n, size, size, C)`.

    **Raises:**

    `ValueError` when there is no image or one is smaller than `size`.
    """
    n = check_int("n", n, minimum=1)
    size = check_int("size", size, minimum=1)
    if not len(images):
        raise ValueError("`images` is empty; give at least one image.")
    for i, im in enumerate(images):
        if im.shape[0] < size or im.shape[1] < size:
            raise ValueError(
                f"`images[{i}]` is {im.shape[0]}x{im.shape[1]}, smaller than the "
                f"patch size {size}; use a patch size of at most "
                f"{min(im.shape[:2])} or leave the image out."
            )
    which, ys, xs = _patch_plan([im.shape[:2] for im in images], n, size, seed)
    channels = images[0].shape[-1]
    out = np.empty((n, size, size, channels), np.float32)
    for k, (i, y, x) in enumerate(zip(which, ys, xs)):
        out[k] = images[i][y : y + size, x : x + size]
    return out


def _patch_plan(
    shapes: Sequence[tuple[int, int]],
    n: int,
    size: int,
    seed: int | np.random.SeedSequence | Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where `random_patches` cuts its patches, from the images' `(H, W)` alone:
    the image of each patch and its top-left corner (`which`, `ys`, `xs`).

    Streaming code cuts the same patches as `random_patches` from images it
    decodes one at a time.
    """
    rng = np.random.default_rng(seed)
    positions = np.array(
        [(h - size + 1) * (w - size + 1) for h, w in shapes], dtype=np.float64
    )
    which = rng.choice(len(shapes), size=n, p=positions / positions.sum())
    ys = np.empty(n, np.int64)
    xs = np.empty(n, np.int64)
    for k, i in enumerate(which):
        ys[k] = rng.integers(shapes[i][0] - size + 1)
        xs[k] = rng.integers(shapes[i][1] - size + 1)
    return which, ys, xs


def write_image(path: str | os.PathLike, image: Float[np.ndarray, "H W C"]) -> None:
    """Write an image with values in `[0, 1]` as an 8-bit file, atomically.

    Values are clipped to `[0, 1]` and rounded to 8 bits; the format follows the
    file name (`.png`, `.jpg`, `.tif`, ...).

    **Arguments:**

    - `path`: the file to write.
    - `image`: an `(H, W)`, `(H, W, 1)` or `(H, W, 3)` array.
    """
    from PIL import Image as PILImage

    name = os.fspath(path)
    array = _with_channels(np.asarray(image), "`image`")
    pixels = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    im = PILImage.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    fmt = PILImage.registered_extensions().get(os.path.splitext(name)[1].lower())
    if fmt is None:
        raise ValueError(
            f"{name!r}: unknown image file ending; use one of "
            f"{', '.join(IMAGE_SUFFIXES)}."
        )
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    atomic_write(name, buf.getvalue())

"""`eqx-steps denoise IMAGE`: denoise an image file with SCICO's pretrained DnCNN
or a model trained by `eqx-steps train`.

    eqx-steps denoise photo.png --variant 6M                # SCICO's pretrained 6M
    eqx-steps denoise photo.png --variant 6M --noise 0.1    # add noise, print SNRs
    eqx-steps denoise photo.png --variant 6N --sigma 0.05   # a noise-level model
    eqx-steps denoise photo.png --run runs/mine             # your own trained model

A colour image is denoised channel by channel when the model takes one channel
(SCICO's denoisers), whole when the model was trained on colour. The image is
denoised in tiles ([`eqx_steps.denoise.denoise_image`][]), so memory stays
bounded whatever its size. The command writes the denoised image and a
side-by-side PNG (original | noisy | denoised with `--noise`, else input |
denoised).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from typing import Any

import numpy as np

from .._io import atomic_write
from .._validate import check_int, check_number
from . import _run_folder as folder
from ._errors import reported, UsageError


_NOISE_LEVEL_CHANNELS = 2  # a noise-level model (SCICO's 6N): image + sigma plane
# The side-by-side picture: panels at most this long, and at least this wide.
_PANEL_MAX, _PANEL_MIN = 1024, 256


def add_parser(commands: Any, formatter: Any) -> None:
    """Add the `denoise` command to the subparsers `commands`."""
    from .._pretrained import SCICO_DNCNN_VARIANTS  # no JAX import for --help

    parser = commands.add_parser(
        "denoise",
        help="denoise an image file with a pretrained or trained model",
        description="Denoise a grayscale or colour image file with SCICO's "
        "pretrained DnCNN (--variant) or the latest checkpoint of a run of "
        "`eqx-steps train` (--run). With --noise, Gaussian noise is added first and "
        "the SNR of the noisy and of the denoised image against the original are "
        "printed. Writes the denoised image and a side-by-side PNG.",
        formatter_class=formatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="a PNG, JPEG or TIFF file")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--variant",
        metavar="NAME",
        help=f"SCICO's pretrained DnCNN: {', '.join(SCICO_DNCNN_VARIANTS)} (6N "
        "takes the noise level), or the path of a SCICO .mpk weights file",
    )
    model.add_argument(
        "--run",
        dest="run_dir",
        metavar="RUN_DIR",
        help="a run folder of `eqx-steps train`: its latest checkpoint",
    )
    parser.add_argument(
        "--noise",
        type=float,
        metavar="S",
        help="add Gaussian noise of std S (pixel values in [0, 1]) before "
        "denoising, and print the SNRs against the original",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the noise (0)"
    )
    parser.add_argument(
        "--sigma",
        type=float,
        metavar="S",
        help="the noise std given to a noise-level model (6N); default: --noise",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="the denoised image (default: <image name>-denoised.png in the current "
        "folder); the side-by-side picture goes beside it as <name>-compare.png",
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=512,
        metavar="T",
        help="denoise in tiles of TxT pixels, to bound memory on large images; 0: "
        "the whole image at once (512)",
    )
    parser.set_defaults(run=run)


def output_paths(image: str, out: str | None) -> tuple[str, str]:
    """The denoised image's path and the side-by-side picture's path, checked.

    **Arguments:**

    - `image`: the input image file.
    - `out`: `--out`, or `None` for `<image stem>-denoised.png` in the current
        folder.

    **Returns:**

    `(denoised, compare)`, `compare` being `<out stem>-compare.png`.

    **Raises:**

    `UsageError` when `out` has no image file ending or its folder does not exist.
    """
    from ..images import IMAGE_SUFFIXES

    if out is None:
        stem = os.path.splitext(os.path.basename(image))[0]
        out = f"{stem}-denoised.png"
    base, suffix = os.path.splitext(out)
    if suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(
            f"--out {out!r} has no image file ending; use one of "
            f"{', '.join(IMAGE_SUFFIXES)}"
        )
    where = os.path.dirname(out)
    if where and not os.path.isdir(where):
        raise UsageError(f"--out {out!r}: folder {where!r} does not exist; create it")
    return out, base + "-compare.png"


def _pretrained(variant: str) -> tuple[Any, Any, str]:
    from ..models import load_scico_dncnn

    with reported("--variant: "):
        model, model_state = load_scico_dncnn(variant)
    return model, model_state, f"SCICO's DnCNN {variant}"


def _trained(run_dir: str, image_channels: int) -> tuple[Any, Any, str]:
    """The latest checkpoint of a run folder: model, state and a description.

    A model trained on `C`-channel images takes `C`-channel images, or each
    channel of any image on its own when `C` is 1: anything else is refused
    before the checkpoint is restored.
    """
    from ._models import build_model, resolve, restore
    from ._settings import DEFAULTS, saved_settings
    from .train import trainer_config

    config = folder.read_config(run_dir)
    where = repr(os.path.join(run_dir, folder.CONFIG_FILE))
    settings = resolve({**DEFAULTS, **saved_settings(config, where)})
    if settings["task"] != "denoise":
        raise UsageError(
            f"the run {run_dir!r} learnt --task {settings['task']}, not denoising; "
            f"restore an image with it by `eqx-steps restore IMAGE --run {run_dir}`"
        )
    with reported(f"{folder.CONFIG_FILE}: "):
        channels = check_int("channels", config.get("channels", 1))
    if channels not in (1, image_channels):
        raise UsageError(
            f"the run {run_dir!r} was trained on {channels}-channel images and "
            f"IMAGE has {image_channels} channel(s); give a {channels}-channel image"
        )
    model, model_state = build_model(settings, channels)
    state = restore(trainer_config(settings, run_dir), model, model_state, run_dir)
    if state is None:
        raise UsageError(
            f"run folder {run_dir!r} holds no checkpoint; train it first with "
            f"`eqx-steps train --out {run_dir} --resume`"
        )
    description = f"{settings['model']} of {run_dir} (step {int(state.step)})"
    return state.model, state.model_state, description


def _noise_level(model: Any, args: argparse.Namespace, name: str) -> float | None:
    """The `sigma` given to the model: `--sigma`, else `--noise` for a noise-level
    model; `None` for other models."""
    if getattr(model, "channels", None) != _NOISE_LEVEL_CHANNELS:
        if args.sigma is not None:
            raise UsageError(
                f"--sigma is for a noise-level model (--variant 6N); {name} takes "
                "the image alone: leave --sigma out"
            )
        return None
    sigma = args.sigma if args.sigma is not None else args.noise
    if sigma is None:
        raise UsageError(
            f"{name} is a noise-level model: give the noise std of the image with "
            "--sigma S (or --noise S to add noise of that std)"
        )
    return sigma


def _check_numbers(args: argparse.Namespace) -> int | None:
    """The options' values checked; the tile size (`None`: untiled)."""
    with reported():
        for flag, value in (("--noise", args.noise), ("--sigma", args.sigma)):
            if value is not None:
                check_number(flag, value, minimum=0)
        check_int("--seed", args.seed, minimum=0)
        tile = check_int("--tile", args.tile, minimum=0)
    return tile or None


def _display_size(image: np.ndarray) -> np.ndarray:
    """`image` scaled by an integer factor for a panel: shrunk (block means) until
    its longer side is at most `_PANEL_MAX` pixels, or enlarged (pixels repeated)
    until its width is at least `_PANEL_MIN`, so the title fits above it."""
    longest = max(image.shape[:2])
    if longest > _PANEL_MAX:
        k = -(-longest // _PANEL_MAX)
        h, w = image.shape[0] // k * k, image.shape[1] // k * k
        return image[:h, :w].reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))
    k = max(1, min(-(-_PANEL_MIN // image.shape[1]), _PANEL_MAX // longest))
    return image.repeat(k, axis=0).repeat(k, axis=1)


def write_comparison(path: str, panels: list[tuple[np.ndarray, str]]) -> None:
    """Write a PNG of images side by side, each under its title, pixel for pixel.

    Each image is shown at an integer scale (1 for images up to 1024 pixels
    long), one screen pixel per scaled pixel.

    **Arguments:**

    - `path`: the PNG file (written atomically).
    - `panels`: `(image, title)` pairs, images `(H, W, C)` of equal shape with
        values in `[0, 1]`.
    """
    from matplotlib.figure import Figure

    from ._run_folder import show_image

    shown = [(_display_size(image), title) for image, title in panels]
    h, w = shown[0][0].shape[:2]
    n, margin, band, dpi = len(shown), 8, 30, 100
    width, height = n * w + (n + 1) * margin, h + band + margin
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    for i, (image, title) in enumerate(shown):
        left = (margin + i * (w + margin)) / width
        ax = fig.add_axes((left, margin / height, w / width, h / height))
        show_image(ax, image, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


def _snr(reference: np.ndarray, image: np.ndarray) -> float:
    from ..metrics import snr

    return float(snr(reference, image))


def _describe(
    path: str, image: np.ndarray, name: str, model: Any, tile, alpha: bool = False
) -> str:
    """The first line printed: the image, the model and how it is applied."""
    h, w, c = image.shape
    dropped = "; its alpha channel is dropped" if alpha else ""
    how = ""
    if c > 1:
        together = getattr(model, "channels", None) == c
        how = ", channels together" if together else ", each channel on its own"
    tiles = f"tiles of {tile}x{tile}" if tile else "untiled"
    return (
        f"eqx-steps denoise: {path} ({w}x{h}, {c} channel(s){dropped}) with "
        f"{name}{how}, {tiles}"
    )


def run(args: argparse.Namespace) -> int:
    """Run `eqx-steps denoise` with the parsed `args`; the exit status."""
    tile = _check_numbers(args)
    out, compare = output_paths(args.image, args.out)
    from ..images import has_alpha, read_image, write_image

    with reported():
        if not os.path.exists(args.image):
            raise FileNotFoundError(
                f"IMAGE {args.image!r} does not exist; give a PNG, JPEG or TIFF file"
            )
        original = read_image(args.image)
        alpha = has_alpha(args.image)
    from ..platform import backends_started, configure_xla_flags

    if not backends_started():
        configure_xla_flags()  # the faster XLA:CPU convolutions; one device is used
    from ..denoise import add_noise

    model, model_state, name = (
        _pretrained(args.variant)
        if args.variant
        else _trained(args.run_dir, original.shape[-1])
    )
    sigma = _noise_level(model, args, name)
    print(_describe(args.image, original, name, model, tile, alpha), flush=True)
    noisy = original
    if args.noise is not None:
        noisy = add_noise(original, args.noise, args.seed)
    start = time.perf_counter()
    with reported():
        denoised = _denoise_with_bar(model, model_state, noisy, sigma, tile)
    seconds = time.perf_counter() - start
    with reported("--out: "):
        write_image(out, denoised)
    # Which model made the picture: SCICO's variant, or the run folder.
    by = (
        f"SCICO {args.variant}"
        if args.variant
        else f"run {os.path.basename(os.path.normpath(args.run_dir))}"
    )
    if args.noise is None:
        panels = [(original, "input"), (denoised, f"denoised by {by}")]
    else:
        snr_in, snr_out = _snr(original, noisy), _snr(original, denoised)
        print(
            f"  noise std {args.noise:g} (seed {args.seed}); SNR against the "
            f"original: noisy {snr_in:.2f} dB, denoised {snr_out:.2f} dB "
            f"({snr_out - snr_in:+.2f} dB)"
        )
        panels = [
            (original, "original"),
            (noisy, f"noisy (std {args.noise:g}): SNR {snr_in:.2f} dB"),
            (denoised, f"{by}: SNR {snr_out:.2f} dB"),
        ]
    write_comparison(compare, panels)
    print(f"  denoised in {seconds:.1f} s; wrote {out} and {compare}")
    return 0


def _denoise_with_bar(model: Any, model_state: Any, image: Any, sigma, tile) -> Any:
    """`denoise_image` with a progress bar over its tiles (on stderr)."""
    import sys

    from tqdm.auto import tqdm

    from ..denoise import denoise_image

    # disable=None: no bar when stderr is not a terminal (logs, pipes, tests).
    bar = tqdm(desc="denoise", unit="tile", file=sys.stderr, leave=False, disable=None)
    with bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return denoise_image(
            model, model_state, image, sigma=sigma, tile=tile, progress=progress
        )

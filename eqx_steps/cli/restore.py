"""`eqx-steps restore IMAGE --run RUN_DIR`: restore an image with a trained run.

    eqx-steps restore noisy.png --run runs/denoiser              # = eqx-steps denoise
    eqx-steps restore blurred.png --run runs/deblur              # a blurred image
    eqx-steps restore photo.png --run runs/deblur --simulate     # blur + noise first
    eqx-steps restore phantom.png --run runs/ct --simulate       # project + noise first
    eqx-steps restore sinogram.npy --run runs/ct                 # a measured sinogram

What IMAGE is depends on the run's task (its `config.json`):

- `denoise`: a noisy image, restored as `eqx-steps denoise IMAGE --run RUN_DIR`
    does (in tiles); `--simulate` adds noise of the run's std (or `--noise`) first.
- `deblur`: a blurred image; with `--simulate`, a clean image that the run's
    operator blurs (and noise is added) first, and the SNRs against it are
    printed. MoDL and ODP are rebuilt for the image's size (the blur is the same
    at any size); a plain CNN applies to any size.
- `ct`: a sinogram, an `.npy` array of the run's `(angles, det_count)` shape; or,
    with `--simulate`, a clean `patch x patch` grayscale image that the run's
    projector measures (with noise) first.

Writes the restored image and a side-by-side PNG (with `--simulate`: original |
measurement | restored, with SNRs; for CT the measurement is shown as its
back-projection `A^T y`, scaled).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

from .._validate import check_int, check_number
from . import _run_folder as folder
from ._errors import reported, UsageError


def add_parser(commands: Any, formatter: Any) -> None:
    """Add the `restore` command to the subparsers `commands`."""
    parser = commands.add_parser(
        "restore",
        help="restore an image (denoise, deblur, CT) with a trained run",
        description="Restore IMAGE with the latest checkpoint of RUN_DIR, by the "
        "run's task: a noisy image (denoise), a blurred image (deblur) or an .npy "
        "sinogram (ct). With --simulate, IMAGE is a clean image that the run's "
        "operator measures (with noise) first, and the SNRs against it are "
        "printed. Writes the restored image and a side-by-side PNG.",
        formatter_class=formatter,
    )
    parser.add_argument(
        "image",
        metavar="IMAGE",
        help="a PNG, JPEG or TIFF file, or an .npy array (a sinogram for ct)",
    )
    parser.add_argument(
        "--run",
        dest="run_dir",
        metavar="RUN_DIR",
        required=True,
        help="a run folder of `eqx-steps train`: its latest checkpoint and task",
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="IMAGE is clean: measure it with the run's operator (blur, project; "
        "denoise: nothing) and add Gaussian noise first, then print the SNRs",
    )
    parser.add_argument(
        "--noise",
        type=float,
        metavar="S",
        help="with --simulate: the noise std (default: the run's --noise)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the noise (0)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="the restored image (default: <image name>-restored.png in the current "
        "folder); the side-by-side picture goes beside it as <name>-compare.png",
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=512,
        metavar="T",
        help="denoise runs: restore in tiles of TxT pixels; 0: untiled (512)",
    )
    parser.set_defaults(run=run)


def _default_out(image: str, out: str | None) -> str:
    if out is not None:
        return out
    return os.path.splitext(os.path.basename(image))[0] + "-restored.png"


def _run_settings(run_dir: str) -> tuple[dict[str, Any], int]:
    """The run's resolved settings and image channels."""
    from ._models import resolve
    from ._settings import DEFAULTS, saved_settings

    config = folder.read_config(run_dir)
    where = repr(os.path.join(run_dir, folder.CONFIG_FILE))
    settings = resolve({**DEFAULTS, **saved_settings(config, where)})
    with reported(f"{folder.CONFIG_FILE}: "):
        channels = check_int("channels", config.get("channels", 1))
    return settings, channels


def _as_denoise(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """A denoising run: `eqx-steps denoise IMAGE --run RUN_DIR`."""
    from . import denoise

    noise = None
    if args.simulate:
        noise = args.noise if args.noise is not None else settings["noise"]
    return denoise.run(
        argparse.Namespace(
            image=args.image,
            variant=None,
            run_dir=args.run_dir,
            noise=noise,
            seed=args.seed,
            sigma=None,
            out=_default_out(args.image, args.out),
            tile=args.tile,
        )
    )


def _read_input(path: str) -> np.ndarray:
    """IMAGE: an image file as `(H, W, C)` in `[0, 1]`, or an `.npy` array."""
    from ..images import read_image

    with reported():
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"IMAGE {path!r} does not exist; give a PNG, JPEG or TIFF file, or "
                "an .npy array"
            )
        if path.lower().endswith(".npy"):
            try:
                array = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UsageError(f"IMAGE {path!r} is not a readable .npy array: {e}")
            if not np.issubdtype(array.dtype, np.number) or array.ndim not in (2, 3):
                raise UsageError(
                    f"IMAGE {path!r} holds an array of shape {array.shape} and dtype "
                    f"{array.dtype}: give a 2-D array (H, W) or (H, W, C) of numbers"
                )
            array = array.astype(np.float32)
            return array[..., None] if array.ndim == 2 else array
        return read_image(path)


def _check_ct_image(path: str, image: np.ndarray, settings: dict[str, Any]) -> None:
    p = settings["patch"]
    h, w, c = image.shape
    if (h, w, c) != (p, p, 1):
        raise UsageError(
            f"IMAGE {path!r} is {h}x{w} with {c} channel(s), but the run's operator "
            f"(--patch {p}) projects {p}x{p} grayscale images: resize it to {p}x{p} "
            f"grayscale, or train a run with --task ct --patch {h}"
        )


def _measurement(
    args: argparse.Namespace, settings: dict[str, Any], image: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """The measurement `y` to restore, the clean image (with --simulate) and the
    noise std used."""
    from ._task_data import measure
    from ._tasks import make_operator

    task, path = settings["task"], args.image
    if not args.simulate:
        if args.noise is not None:
            raise UsageError(
                "--noise goes with --simulate: it is the std of the noise added to "
                "the simulated measurement"
            )
        if task == "ct":
            shape = tuple(settings_sinogram(settings))
            if image.shape[:2] != shape or image.shape[2] != 1:
                raise UsageError(
                    f"IMAGE {path!r} has shape {image.shape[:2]}"
                    + (f" with {image.shape[2]} channels" if image.shape[2] > 1 else "")
                    + f", but the run's operator gives sinograms of shape {shape} "
                    f"(--angles {shape[0]}, --det-count {shape[1]}): give a sinogram "
                    "of that shape as an .npy array, or a clean "
                    f"{settings['patch']}x{settings['patch']} image with --simulate"
                )
        return image, None, None
    noise = args.noise if args.noise is not None else settings["noise"]
    if task == "ct":
        _check_ct_image(path, image, settings)
        op = make_operator(settings, (settings["patch"],) * 2)
    else:
        shape = image.shape[:2] if image.shape[2] == 1 else image.shape
        op = make_operator(settings, tuple(shape))
    return measure(op, image[None], noise, args.seed)[0], image, noise


def settings_sinogram(settings: dict[str, Any]) -> tuple[int, int]:
    """The sinogram shape of a ct run: `(angles, det_count)`."""
    return settings["angles"], settings["det_count"]


def _check_channels(
    path: str, image: np.ndarray, channels: int, run_dir: str, task: str
) -> None:
    if image.shape[-1] != channels and task != "ct":
        raise UsageError(
            f"the run {run_dir!r} was trained on {channels}-channel images and "
            f"IMAGE {path!r} has {image.shape[-1]} channel(s); give a "
            f"{channels}-channel image"
        )


def _check_psf_fits(path: str, image: np.ndarray, settings: dict[str, Any]) -> None:
    k, (h, w) = settings["psf_size"], image.shape[:2]
    if h < k or w < k:
        raise UsageError(
            f"IMAGE {path!r} is {h}x{w}, smaller than the run's {k}x{k} blur kernel "
            f"(--psf-size {k}): give an image at least {k}x{k}"
        )


def _restore_model(
    settings: dict[str, Any], channels: int, run_dir: str
) -> tuple[Any, Any, int]:
    from ._models import build_model, restore
    from .train import trainer_config

    model, model_state = build_model(settings, channels)
    state = restore(trainer_config(settings, run_dir), model, model_state, run_dir)
    if state is None:
        raise UsageError(
            f"run folder {run_dir!r} holds no checkpoint; train it first with "
            f"`eqx-steps train --out {run_dir} --resume`"
        )
    return state.model, state.model_state, int(state.step)


def _apply(model: Any, model_state: Any, y: np.ndarray) -> np.ndarray:
    """The model on one measurement, in inference mode."""
    import jax.numpy as jnp

    from .._forward import per_example

    with reported():
        out, _ = per_example(model, model_state, jnp.asarray(y)[None], inference=True)
    return np.asarray(out[0], np.float32)


def _check_options(args: argparse.Namespace) -> None:
    with reported():
        if args.noise is not None:
            check_number("--noise", args.noise, positive=True)
        check_int("--seed", args.seed, minimum=0)
        check_int("--tile", args.tile, minimum=0)


def run(args: argparse.Namespace) -> int:
    """Run `eqx-steps restore` with the parsed `args`; the exit status."""
    _check_options(args)
    settings, channels = _run_settings(args.run_dir)
    if settings["task"] == "denoise":
        return _as_denoise(args, settings)
    from .denoise import output_paths

    out, compare = output_paths(args.image, _default_out(args.image, args.out))
    image = _read_input(args.image)
    task = settings["task"]
    if task == "deblur":
        _check_channels(args.image, image, channels, args.run_dir, task)
        _check_psf_fits(args.image, image, settings)
    from ..platform import backends_started, configure_xla_flags

    if not backends_started():
        configure_xla_flags()  # the faster XLA:CPU convolutions; one device is used
    from ._task_data import reference
    from ._tasks import at_shape, describe, names

    y, clean, noise = _measurement(args, settings, image)
    model, model_state, step = _restore_model(settings, channels, args.run_dir)
    if task == "deblur":
        shape = y.shape[:2] if channels == 1 else y.shape
        model = at_shape(settings, model, channels, tuple(shape))
        if settings["model"] == "unet":
            factor = 2 ** (settings["depth"] - 1)
            if y.shape[0] % factor or y.shape[1] % factor:
                raise UsageError(
                    f"IMAGE {args.image!r} is {y.shape[0]}x{y.shape[1]}; the run's "
                    f"unet (--depth {settings['depth']}) needs sides divisible by "
                    f"{factor}: crop the image"
                )
    h, w = (y.shape[:2]) if task == "deblur" else (settings["patch"],) * 2
    kind = "measured" if clean is None else "clean, simulated"
    print(
        f"eqx-steps restore: {args.image} ({kind}, {h}x{w}) with {settings['model']} "
        f"of {args.run_dir} (step {step}; {describe(settings)})",
        flush=True,
    )
    start = time.perf_counter()
    restored = _apply(model, model_state, y)
    seconds = time.perf_counter() - start
    with reported("--out: "):
        from ..images import write_image

        write_image(out, np.clip(restored, 0, 1))
    truth_name, measured_name, restored_name = names(settings)
    shown = reference(settings, y[None], None if clean is None else clean[None])[0]
    by = f"run {os.path.basename(os.path.normpath(args.run_dir))}"
    if clean is None:
        panels = [(shown, measured_name), (restored, f"restored by {by}")]
    else:
        from ..metrics import snr

        snr_in, snr_out = float(snr(clean, shown)), float(snr(clean, restored))
        print(
            f"  noise std {noise:g} (seed {args.seed}); SNR against the original: "
            f"{measured_name} {snr_in:.2f} dB, restored {snr_out:.2f} dB "
            f"({snr_out - snr_in:+.2f} dB)"
        )
        panels = [
            (clean, "original"),
            (shown, f"{measured_name}: SNR {snr_in:.2f} dB"),
            (restored, f"{by}: SNR {snr_out:.2f} dB"),
        ]
    from .denoise import write_comparison

    write_comparison(compare, [(np.clip(p, 0, 1), t) for p, t in panels])
    print(f"  restored in {seconds:.1f} s; wrote {out} and {compare}")
    return 0

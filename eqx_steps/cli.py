"""The `eqx-steps` command: train an image denoiser, evaluate it, inspect a run.

    eqx-steps train                      # DnCNN on synthetic patches, all local devices
    eqx-steps train --model unet --epochs 5 --out runs/unet
    eqx-steps train --out runs/unet --resume --epochs 8
    eqx-steps evaluate runs/unet
    eqx-steps info runs/unet

`python -m eqx_steps` is the same command. Nothing is downloaded: the data are
the synthetic phantoms of [`eqx_steps.synthetic.make_denoising_data`][], a
deterministic function of `--seed`, `--noise`, `--patch` and the set sizes, so
`evaluate` regenerates the exact test set from the run's `config.json`.

`train` builds the model and a [`eqx_steps.BasicTrainer`][] (progress bar,
`metrics.jsonl` and orbax checkpoints in the run folder) and then writes
`curves.png` (loss and SNR against steps), `samples.png` (test patches: clean,
noisy, denoised) and prints the test SNR/PSNR of the noisy input and of the
output. Every setting can also come from a TOML or JSON file (`--config`);
command-line options override it.

Devices: the run uses every local device. Without an accelerator, the host CPU
is split into `--devices N` XLA devices (default `min(4, os.cpu_count())`), so
the data-parallel path is the one exercised even on a laptop; XLA reads that
setting when its backend starts, so the command sets it before anything touches
JAX ([`eqx_steps.cli.configure_xla_flags`][]).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import io
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from ._io import atomic_write
from .distributed import backends_started


__all__ = ["configure_xla_flags", "default_cpu_devices", "main"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
SAMPLES_FILE = "samples.png"

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


# ---------------------------------------------------------------------------
# XLA flags and devices: must run before JAX starts its backends.


def _jaxlib_version() -> tuple[int, ...]:
    try:
        text = version("jaxlib")
    except PackageNotFoundError:
        return ()
    return tuple(int(v) for v in re.findall(r"\d+", text)[:3])


def default_cpu_devices() -> int:
    """The number of CPU devices the command uses when `--devices` is not given.

    `min(4, os.cpu_count())`: enough devices that the data-parallel path (batch
    split across devices, gradients averaged) is what runs, without splitting a
    small machine into more devices than it has cores.
    """
    return max(1, min(4, os.cpu_count() or 1))


def configure_xla_flags(devices: int | None = None) -> str:
    """Set `XLA_FLAGS` for a run on `devices` CPU devices; call before JAX starts.

    XLA reads `XLA_FLAGS` once, when its backend starts (the first
    `jax.devices()`, array or model), not when `jax` is imported, so this must run
    before any of those. It

    - sets `--xla_force_host_platform_device_count=devices` (replacing any count
        already there) when `devices` is given: the host CPU becomes `devices`
        XLA devices. It only concerns the CPU platform; a GPU or TPU run uses its
        accelerators whatever the value.
    - adds `--xla_cpu_experimental_ynn_fusion_type=` (empty: the experimental
        fusion off) when the user has not set `XLA_FLAGS` at all and jaxlib is
        0.10 or newer: XLA:CPU of jaxlib 0.10 runs DnCNN-style convolutions about
        3x faster without it. Older jaxlibs abort on this unknown flag, so it is
        never added there, and a user's own `XLA_FLAGS` is kept as it is.

    The benchmarks and the command share this one function.

    **Arguments:**

    - `devices`: the number of CPU devices, or `None` to leave the count alone.

    **Returns:**

    The new value of `XLA_FLAGS` (also set in `os.environ`).
    """
    user = os.environ.get("XLA_FLAGS")
    flags = (user or "").split()
    if devices is not None:
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ValueError(f"`devices` must be an int >= 1, got {devices!r}.")
        flags = [f for f in flags if not f.startswith(_DEVICE_COUNT_FLAG + "=")]
        flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
    if user is None and _jaxlib_version() >= (0, 10):
        flags.append(_YNN_FLAG)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]


# ---------------------------------------------------------------------------
# Errors: one line on stderr and exit status 2, never a traceback.


class _UsageError(Exception):
    """A bad option, file or folder: reported on one line, exit status 2."""


def _one_line(error: BaseException | str) -> str:
    text = str(error) if not isinstance(error, str) else error
    return " ".join(text.split()) or type(error).__name__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # pyright: ignore[reportIncompatibleMethodOverride]
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


# ---------------------------------------------------------------------------
# The settings: one table for the options, the config file and config.json.


@dataclasses.dataclass(frozen=True)
class _Setting:
    name: str  # the key (config files, config.json); the option is --name-with-dashes
    kind: type  # int, float or str
    default: Any
    help: str
    minimum: float | None = None
    positive: bool = False  # > 0 rather than >= minimum
    choices: tuple[str, ...] = ()
    nullable: bool = False
    saved: bool = True  # a setting of the run, stored in config.json

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, raw: object, where: str) -> Any:
        """Validate a value from the command line or a config file."""
        if raw is None and self.nullable:
            return None
        value: Any = raw
        if self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                ok = math.isfinite(value)
        else:
            ok = isinstance(value, self.kind) and not isinstance(value, bool)
        if not ok:
            kind = {int: "an integer", float: "a finite number", str: "a string"}
            raise _UsageError(
                f"{where} must be {kind[self.kind]}, got {value!r}"
                + (" (or null)" if self.nullable else "")
            )
        if self.choices and value not in self.choices:
            close = difflib.get_close_matches(str(value), self.choices, n=1)
            raise _UsageError(
                f"{where} must be one of {', '.join(self.choices)}, got {value!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        if self.positive and value <= 0:
            raise _UsageError(f"{where} must be > 0, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise _UsageError(f"{where} must be >= {self.minimum:g}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """Convert and validate a command-line string (argparse's `type=`)."""
        try:
            value = self.kind(text)
        except ValueError:
            kind = {int: "an integer", float: "a number", str: "a string"}[self.kind]
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        try:
            return self.check(value, self.flag)
        except _UsageError as e:
            raise argparse.ArgumentTypeError(
                str(e).removeprefix(self.flag + " ")
            ) from None


MODELS = ("dncnn", "convbn", "resnet", "unet")
MODEL_DEPTH = {"dncnn": 6, "convbn": 6, "resnet": 6, "unet": 3}
"""The default `--depth` of each model (UNet: levels, each halving the size)."""

_SETTINGS: tuple[_Setting, ...] = (
    _Setting("model", str, "dncnn", "the denoiser", choices=MODELS),
    _Setting(
        "depth",
        int,
        None,
        "number of convolution layers (unet: levels, each halving the patch size; "
        "the patch must be divisible by 2**(depth-1)) (default: "
        + ", ".join(f"{m} {d}" for m, d in MODEL_DEPTH.items())
        + ")",
        minimum=1,
        nullable=True,
    ),
    _Setting("filters", int, 32, "filters of the hidden layers", minimum=1),
    _Setting("epochs", int, 3, "training epochs (passes over the training set)", 1),
    _Setting(
        "batch_size",
        int,
        16,
        "global batch size, split across the devices (a multiple of their count)",
        1,
    ),
    _Setting("lr", float, 3e-3, "learning rate of Adam", positive=True),
    _Setting(
        "noise",
        float,
        0.2,
        "standard deviation of the Gaussian noise added to the [0, 1] patches",
        positive=True,
    ),
    _Setting("patch", int, 32, "patch height and width in pixels", minimum=1),
    _Setting("train_size", int, 1024, "number of training patches", minimum=1),
    _Setting("test_size", int, 128, "number of test patches", minimum=1),
    _Setting("seed", int, 0, "seed of the data, the initialisation and the order", 0),
    _Setting(
        "backend",
        str,
        None,
        "data-parallel backend: pmap (eqx.filter_pmap) or sharded (shard_map "
        "under jit; needed across processes) (default: pmap, or sharded for a "
        "multi-process run)",
        choices=("pmap", "sharded"),
        nullable=True,
    ),
    _Setting(
        "steps_per_call",
        int,
        1,
        "training steps per dispatch (lax.scan of K steps)",
        minimum=1,
    ),
    _Setting(
        "devices",
        int,
        None,
        "number of CPU devices to split the host into when there is no "
        "accelerator (a GPU/TPU run uses all local accelerators) (default: "
        "min(4, CPU cores), or the count already in XLA_FLAGS)",
        minimum=1,
        nullable=True,
    ),
    _Setting(
        "out",
        str,
        None,
        "run folder (default: runs/<model>-<date>-<time>)",
        nullable=True,
        saved=False,
    ),
    _Setting(
        "coordinator",
        str,
        None,
        "HOST:PORT of process 0's coordinator, for a multi-process run (default: "
        "$JAX_COORDINATOR_ADDRESS)",
        nullable=True,
        saved=False,
    ),
    _Setting(
        "num_processes",
        int,
        None,
        "number of processes of a multi-process run (default: $JAX_NUM_PROCESSES)",
        minimum=1,
        nullable=True,
        saved=False,
    ),
    _Setting(
        "process_id",
        int,
        None,
        "this process's index, 0 to num_processes-1 (default: $JAX_PROCESS_ID)",
        minimum=0,
        nullable=True,
        saved=False,
    ),
)
SETTINGS = {s.name: s for s in _SETTINGS}
DEFAULTS = {s.name: s.default for s in _SETTINGS}


def _help(s: _Setting) -> str:
    if "(default:" in s.help:
        return s.help
    return f"{s.help} (default: {s.default})"


def _config_key(key: Any, where: str) -> str:
    name = str(key).replace("-", "_")
    if name not in SETTINGS:
        close = difflib.get_close_matches(name, list(SETTINGS), n=1)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else "valid keys are " + ", ".join(SETTINGS)
        )
        raise _UsageError(f"{where}: unknown key {str(key)!r}; {hint}")
    return name


def _read_config_file(path: str) -> dict[str, Any]:
    """The settings of a TOML or JSON file, validated like the options."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _UsageError(
            f"cannot read config file {path!r}: {e.strerror or e}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _UsageError(f"config file {path!r} is not UTF-8 text") from None
    suffix = os.path.splitext(path)[1].lower()
    parsers: list[tuple[str, Callable[[str], Any]]] = [
        ("JSON", json.loads),
        ("TOML", tomllib.loads),
    ]
    if suffix == ".toml":
        parsers.reverse()
    elif suffix == ".json":
        parsers = parsers[:1]
    errors = []
    config: Any = None
    for name, load in parsers:
        try:
            config = load(text)
            break
        except (ValueError, tomllib.TOMLDecodeError) as e:
            errors.append(f"not valid {name} ({_one_line(e)})")
    else:
        raise _UsageError(f"config file {path!r} is " + " and ".join(errors))
    if not isinstance(config, dict):
        raise _UsageError(
            f"config file {path!r} must hold a table of settings such as "
            f'{{"model": "dncnn", "epochs": 3}}, got {type(config).__name__}'
        )
    out = {}
    for key, value in config.items():
        name = _config_key(key, f"config file {path!r}")
        out[name] = SETTINGS[name].check(value, f"{name!r} in {path!r}")
    return out


# ---------------------------------------------------------------------------
# Small file helpers.


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise _UsageError(f"{path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise _UsageError(f"cannot read {path!r}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise _UsageError(f"{path!r} does not hold a JSON object")
    return data


def _run_config(run_dir: str) -> dict[str, Any]:
    """The settings stored in `run_dir/config.json`, validated."""
    if not os.path.isdir(run_dir):
        raise _UsageError(
            f"run folder {run_dir!r} does not exist; give the folder that "
            "`eqx-steps train --out` wrote"
        )
    path = os.path.join(run_dir, CONFIG_FILE)
    saved = _read_json(path)
    if "model" not in saved:
        raise _UsageError(
            f"{path!r} has no 'model' setting: it was not written by `eqx-steps "
            "train` (or the run was killed during a checkpoint save); add the "
            "settings of the run to it"
        )
    settings = {}
    for s in _SETTINGS:
        if s.saved and s.name in saved:
            settings[s.name] = s.check(saved[s.name], f"{s.name!r} in {path!r}")
    return settings


def _read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a damaged line costs one point of the curves
    return records


# ---------------------------------------------------------------------------
# Model, data and metrics.


def _model_class(name: str) -> Any:
    from . import models

    return {
        "dncnn": models.DnCNN,
        "convbn": models.ConvBNNet,
        "resnet": models.ResNet,
        "unet": models.UNet,
    }[name]


def _resolve(settings: dict[str, Any]) -> dict[str, Any]:
    """Fill the model-dependent defaults and check the combinations."""
    settings = dict(settings)
    if settings.get("depth") is None:
        settings["depth"] = MODEL_DEPTH[settings["model"]]
    if settings["model"] == "unet":
        factor = 2 ** (settings["depth"] - 1)
        if settings["patch"] % factor:
            raise _UsageError(
                f"--patch {settings['patch']} is not divisible by 2**(depth-1) = "
                f"{factor}, which unet with --depth {settings['depth']} needs; use "
                f"--patch {max(factor, settings['patch'] // factor * factor)} or "
                "a smaller --depth"
            )
    return settings


def _build_model(settings: Mapping[str, Any]) -> tuple[Any, Any]:
    import equinox as eqx
    import jax

    cls = _model_class(settings["model"])
    key = jax.random.fold_in(jax.random.key(settings["seed"]), 1)
    try:
        return eqx.nn.make_with_state(cls)(
            depth=settings["depth"],
            channels=1,
            num_filters=settings["filters"],
            key=key,
        )
    except (ValueError, TypeError) as e:
        raise _UsageError(f"{settings['model']}: {_one_line(e)}") from None


def _datasets(settings: Mapping[str, Any], *, train: bool = True):
    from .synthetic import make_denoising_data

    try:
        return make_denoising_data(
            settings["train_size"] if train else 1,
            settings["test_size"],
            size=settings["patch"],
            channels=1,
            noise_std=settings["noise"],
            seed=settings["seed"],
        )
    except (ValueError, TypeError) as e:
        raise _UsageError(_one_line(e)) from None


def _per_example_quality(
    label: np.ndarray, images: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-example `(snr, psnr)` of each of `images` against `label`, in dB."""
    import jax

    from .metrics import psnr, snr

    fn = jax.jit(jax.vmap(lambda r, c: (snr(r, c), psnr(r, c, 1.0))))
    return [tuple(np.asarray(v) for v in fn(label, x)) for x in images]  # pyright: ignore


def _local(tree: Any) -> Any:
    """A host copy of each array leaf (a multi-process array: this process's copy)."""
    import jax

    def leaf(x):
        if isinstance(x, jax.Array):
            if not x.is_fully_addressable:
                x = x.addressable_data(0)
            return np.asarray(x)
        return x

    return jax.tree_util.tree_map(leaf, tree)


def _eval_batch_size(batch_size: int) -> int:
    import jax

    n = jax.device_count()
    return max(n, -(-batch_size // n) * n)


def _denoise(
    settings: Mapping[str, Any],
    model: Any,
    model_state: Any,
    test_ds: Mapping[str, np.ndarray],
    workdir: str | None = None,
) -> np.ndarray:
    from .apply import only_apply

    batch_size = _eval_batch_size(settings["batch_size"])
    local = np.asarray(
        only_apply(
            {"batch_size": batch_size},
            model,
            test_ds,
            model_state=model_state,
            workdir=workdir,
        )
    )
    return _gather(local, len(test_ds["image"]), batch_size)


def _gather(local: np.ndarray, n: int, batch_size: int) -> np.ndarray:
    """All `n` outputs in test-set order, on every process.

    In a multi-process run `only_apply` returns this process's rows of each
    evaluation batch (those `IterateData` gives it); the rows of every process
    are gathered and put back in order.
    """
    import jax

    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    from .data import IterateData, MASK_KEY

    rows = []
    for p in range(count):
        batches = IterateData(
            {"index": np.arange(n)},
            batch_size,
            train=False,
            process_index=p,
            process_count=count,
        )
        rows.append(np.concatenate([b["index"][b[MASK_KEY] > 0] for b in batches]))
    padded = np.zeros((max(map(len, rows)), *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    out = np.empty((n, *local.shape[1:]), local.dtype)
    for p, index in enumerate(rows):
        out[index] = gathered[p, : len(index)]
    return out


def _summary(
    settings: Mapping[str, Any], test_ds: Mapping[str, np.ndarray], output: np.ndarray
) -> tuple[str, dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """The printed summary, its numbers and the per-example SNRs (input, output)."""
    (snr_in, psnr_in), (snr_out, psnr_out) = _per_example_quality(
        test_ds["label"], [test_ds["image"], output]
    )
    m = {
        "snr_noisy": float(np.mean(snr_in)),
        "psnr_noisy": float(np.mean(psnr_in)),
        "snr_denoised": float(np.mean(snr_out)),
        "psnr_denoised": float(np.mean(psnr_out)),
    }
    m["snr_gain"] = m["snr_denoised"] - m["snr_noisy"]
    m["psnr_gain"] = m["psnr_denoised"] - m["psnr_noisy"]
    n, p = len(output), settings["patch"]
    text = "\n".join(
        [
            f"Test set: {n} patches of {p}x{p}, noise std {settings['noise']:g}; "
            "mean over patches (PSNR with peak 1):",
            f"  {'':<13}{'SNR (dB)':>10}{'PSNR (dB)':>11}",
            f"  {'noisy input':<13}{m['snr_noisy']:>10.2f}{m['psnr_noisy']:>11.2f}",
            f"  {'denoised':<13}{m['snr_denoised']:>10.2f}{m['psnr_denoised']:>11.2f}",
            f"  {'improvement':<13}{m['snr_gain']:>+10.2f}{m['psnr_gain']:>+11.2f}",
        ]
    )
    return text, m, (snr_in, snr_out)


def _plot_samples(
    path: str,
    test_ds: Mapping[str, np.ndarray],
    output: np.ndarray,
    snrs: tuple[np.ndarray, np.ndarray],
    title: str,
    count: int = 4,
) -> None:
    """A grid of test patches, one per row: clean, noisy, denoised (PNG, atomic)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, any backend

    n = len(output)
    rows = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    fig = Figure(figsize=(6.6, 2.15 * len(rows) + 0.5), dpi=90)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    snr_in, snr_out = snrs
    for r, i in enumerate(rows):
        panels = (
            (test_ds["label"][i], f"clean #{i}"),
            (test_ds["image"][i], f"noisy: {snr_in[i]:.1f} dB"),
            (output[i], f"denoised: {snr_out[i]:.1f} dB"),
        )
        for ax, (img, name) in zip(axes[r], panels):
            ax.imshow(
                np.asarray(img)[..., 0],
                cmap="gray",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_title(name, fontsize=10)
            ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------
# The subcommands.


def _distributed_args(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    from .distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES

    given = {
        "coordinator_address": settings.get("coordinator"),
        "num_processes": settings.get("num_processes"),
        "process_id": settings.get("process_id"),
    }
    if all(v is None for v in given.values()) and not (
        os.environ.get(ENV_COORDINATOR) or os.environ.get(ENV_NUM_PROCESSES)
    ):
        return None
    return given


def _start_jax(devices: int | None, distributed: dict[str, Any] | None) -> None:
    """Configure the devices (and join a multi-process job) before JAX starts."""
    import jax

    if backends_started():
        if distributed is not None:
            raise _UsageError(
                "the multi-process options need a fresh process: JAX has already "
                "started in this one"
            )
        n = jax.local_device_count()
        if devices is not None and devices != n and jax.default_backend() == "cpu":
            raise _UsageError(
                f"--devices {devices}: JAX has already started in this process with "
                f"{n} devices; pass --devices {n} or leave it out"
            )
        return
    if devices is None and _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
        devices = default_cpu_devices()
    configure_xla_flags(devices)
    if distributed is not None:
        from .distributed import initialize

        try:
            initialize(**distributed)
        except (ValueError, TypeError) as e:
            raise _UsageError(_one_line(e)) from None


def _default_out(model: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{model}-{stamp}")
    out, i = base, 1
    while os.path.exists(out):
        out, i = f"{base}-{i}", i + 1
    return out


def _train(args: argparse.Namespace) -> int:
    cli = {k: v for k, v in vars(args).items() if k in SETTINGS and v is not None}
    from_file = _read_config_file(args.config) if args.config else {}
    out = cli.get("out", from_file.get("out"))
    distributed = _distributed_args({**from_file, **cli})
    saved: dict[str, Any] = {}
    if args.resume:
        if out is None:
            raise _UsageError("--resume needs --out RUN_DIR, the run to continue")
        saved = _run_config(out)
    elif out is not None and os.path.exists(out):
        if not os.path.isdir(out):
            raise _UsageError(f"--out {out!r} is a file, not a folder")
        if os.listdir(out):
            raise _UsageError(
                f"run folder {out!r} already exists and is not empty; pass --resume "
                "to continue it, or choose another --out"
            )
    if out is None:
        if distributed is not None:
            raise _UsageError(
                "a multi-process run needs --out: every process must name the same "
                "run folder"
            )
        out = _default_out(cli.get("model", from_file.get("model", "dncnn")))
    settings = _resolve({**DEFAULTS, **saved, **from_file, **cli})
    if distributed is not None:
        if settings["backend"] == "pmap":
            raise _UsageError(
                "--backend pmap cannot run across processes; use --backend sharded"
            )
        settings["backend"] = "sharded"
    elif settings["backend"] is None:
        settings["backend"] = "pmap"

    _start_jax(settings["devices"], distributed)

    import jax

    from .checkpoint import latest_step
    from .trainer import BasicTrainer, History

    is_main = jax.process_index() == 0

    def say(text: str) -> None:
        if is_main:
            print(text, flush=True)

    train_ds, test_ds = _datasets(settings)
    model, model_state = _build_model(settings)
    steps_per_epoch = max(1, settings["train_size"] // settings["batch_size"])
    num_steps = steps_per_epoch * settings["epochs"]
    workdir = os.path.abspath(out)
    train_config = {
        "seed": settings["seed"],
        "batch_size": settings["batch_size"],
        "num_epochs": settings["epochs"],
        "base_learning_rate": settings["lr"],
        "log": True,
        "workdir": workdir,
        "checkpointing": True,
        "backend": settings["backend"],
        "steps_per_call": settings["steps_per_call"],
        # ~15 log points (each evaluates the whole test set) and a checkpoint per
        # epoch (the trainer also saves the last step).
        "log_every_steps": max(1, -(-num_steps // 15)),
        "steps_per_checkpoint": steps_per_epoch,
    }
    saved_settings = {
        k: v for k, v in settings.items() if k in SETTINGS and SETTINGS[k].saved
    }
    run_config = {
        **saved_settings,
        **train_config,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }

    # The folder exists before the trainer looks for checkpoints in it, so that
    # every process of a multi-process run sees the same thing there.
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    if distributed is not None:
        # Every process has checked and created the folder before any writes in it.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("eqx-steps: run folder ready")

    def write_config() -> None:
        if is_main:
            data = json.dumps(run_config, indent=2).encode() + b"\n"
            atomic_write(os.path.join(workdir, CONFIG_FILE), data)

    try:
        trainer = BasicTrainer(
            train_config, model, train_ds, test_ds, model_state=model_state
        )
    except (ValueError, TypeError, FileNotFoundError) as e:
        if created and is_main and not os.listdir(workdir):
            os.rmdir(workdir)  # a refused run leaves nothing behind
        raise _UsageError(_one_line(e)) from None
    start = int(_local(trainer.state.step))
    if args.resume and start == 0:
        say(f"No checkpoint in {out!r} yet: starting from step 0.")
    write_config()
    devices = jax.devices()
    say(
        f"eqx-steps train: {settings['model']} (depth {settings['depth']}, "
        f"{settings['filters']} filters) on {len(devices)} {devices[0].platform} "
        f"device(s) in {jax.process_count()} process(es), backend "
        f"{settings['backend']}\n"
        f"  data: {settings['train_size']} training / {settings['test_size']} test "
        f"patches of {settings['patch']}x{settings['patch']}, noise std "
        f"{settings['noise']:g}\n"
        f"  {settings['epochs']} epochs x {trainer.steps_per_epoch} steps of batch "
        f"{settings['batch_size']}, lr {settings['lr']:g}"
        + (f", resuming at step {start}" if start else "")
        + f"\n  run folder: {out}"
    )
    try:
        state, _ = trainer.train()
    finally:
        # The trainer's checkpoints write their own (smaller) config.json; put
        # back the full settings, even when training is interrupted.
        write_config()

    if is_main:
        records = _read_metrics(workdir)
        if records:
            History(records=records).plot(os.path.join(workdir, CURVES_FILE))
    model, model_state = _local((state.model, state.model_state))
    output = _denoise(settings, model, model_state, test_ds)
    text, _, snrs = _summary(settings, test_ds, output)
    if is_main:
        _plot_samples(
            os.path.join(workdir, SAMPLES_FILE),
            test_ds,
            output,
            snrs,
            f"{settings['model']} after {int(_local(state.step))} steps, "
            f"noise std {settings['noise']:g}",
        )
    last = latest_step(workdir)
    say(text)
    say(
        f"Run folder {out}: {CONFIG_FILE}, {METRICS_FILE}, checkpoints (latest step "
        f"{last}), {CURVES_FILE}, {SAMPLES_FILE}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    settings = _resolve({**DEFAULTS, **_run_config(args.run_dir)})
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    _start_jax(args.devices, None)
    from .checkpoint import latest_step

    step = latest_step(args.run_dir)
    if step is None:
        raise _UsageError(
            f"run folder {args.run_dir!r} holds no checkpoint; train it with "
            f"`eqx-steps train --out {args.run_dir} --resume`"
        )
    _, test_ds = _datasets(settings, train=False)
    model, model_state = _build_model(settings)
    try:
        output = _denoise(settings, model, model_state, test_ds, args.run_dir)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise _UsageError(_one_line(e)) from None
    print(f"{args.run_dir}: {settings['model']}, checkpoint step {step}")
    print(_summary(settings, test_ds, output)[0])
    return 0


def _info(args: argparse.Namespace) -> int:
    settings = _resolve({**DEFAULTS, **_run_config(args.run_dir)})
    config = _read_json(os.path.join(args.run_dir, CONFIG_FILE))
    _start_jax(None, None)

    from .apply import restore_state
    from .checkpoint import latest_step
    from .trainer import parameter_overview

    print(f"Run folder: {args.run_dir}")
    print(f"Configuration ({CONFIG_FILE}):")
    width = max(map(len, config), default=0)
    for k, v in config.items():
        print(f"  {k:<{width}}  {json.dumps(v)}")
    model, model_state = _build_model(settings)
    step = latest_step(args.run_dir)
    if step is None:
        print("No checkpoint: the parameters of the initial model.")
    else:
        try:
            _, state = restore_state({}, model, model_state, args.run_dir)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise _UsageError(_one_line(e)) from None
        model, model_state = state.model, state.model_state
        print(f"Parameters at checkpoint step {step}:")
    print(parameter_overview(model))
    if model_state is not None:
        print("Batch-norm statistics:")
        print(parameter_overview(model_state))
    records = _read_metrics(args.run_dir)
    if records:
        last = records[-1]
        print(f"Last metrics record ({METRICS_FILE}, {len(records)} records):")
        print(
            "  "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in last.items()
            )
        )
    else:
        print(f"No metrics records ({METRICS_FILE} is missing or empty).")
    return 0


# ---------------------------------------------------------------------------
# The parser and the entry point.


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=30)


def build_parser(prog: str = "eqx-steps") -> argparse.ArgumentParser:
    """The argument parser of the command (subcommands `train`, `evaluate`, `info`)."""
    parser = _Parser(
        prog=prog,
        description="Train an Equinox image denoiser on synthetic data on every "
        "local device, evaluate it, inspect a run.",
        formatter_class=_formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a denoiser and write a run folder",
        description="Train a denoiser on synthetic patches (noisy -> clean) on all "
        "local devices, with a progress bar. The run folder gets config.json, "
        "metrics.jsonl, orbax checkpoints, curves.png and samples.png; the test "
        "SNR/PSNR of the input and of the output are printed at the end.",
        formatter_class=_formatter,
    )
    for s in _SETTINGS:
        train.add_argument(
            s.flag,
            type=s.parse,
            default=None,
            metavar=s.name.upper()
            if not s.choices
            else "{" + ",".join(s.choices) + "}",
            help=_help(s),
        )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint, with its saved "
        "settings (options given here override them, e.g. more --epochs)",
    )
    train.add_argument(
        "--config",
        metavar="FILE",
        help="TOML or JSON file of settings with the keys of these options (e.g. "
        '{"model": "unet", "epochs": 5}); command-line options override it',
    )
    train.set_defaults(run=_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="test metrics of a run's latest checkpoint",
        description="Restore the latest checkpoint of RUN_DIR (the model rebuilt "
        "from its config.json), regenerate the same synthetic test set and print "
        "the SNR/PSNR of the noisy input and of the output.",
        formatter_class=_formatter,
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    evaluate.add_argument(
        "--devices",
        type=SETTINGS["devices"].parse,
        default=None,
        metavar="DEVICES",
        help=_help(SETTINGS["devices"]),
    )
    evaluate.add_argument(
        "--batch-size",
        type=SETTINGS["batch_size"].parse,
        default=None,
        metavar="BATCH_SIZE",
        help="evaluation batch size, rounded up to a multiple of the device count "
        "(default: the run's)",
    )
    evaluate.set_defaults(run=_evaluate)

    info = sub.add_parser(
        "info",
        help="configuration, parameters and last metrics of a run",
        description="Print the configuration of RUN_DIR, the parameter overview of "
        "its latest checkpoint and its last metrics record.",
        formatter_class=_formatter,
    )
    info.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "eqx-steps") -> int:
    """Run the `eqx-steps` command.

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`), e.g. `["train", "--epochs",
        "5"]`.
    - `prog`: the command name shown in help and error messages.

    **Returns:**

    The exit status, 0. A bad option, file or folder prints one line on stderr
    and raises `SystemExit(2)`.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    command = f"{prog} {args.command}"
    try:
        return args.run(args)
    except _UsageError as e:
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

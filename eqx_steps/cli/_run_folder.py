"""The run folder: the one writer of `config.json` and of the pictures.

A run folder holds

- `config.json`: the run's settings, its trainer configuration and what it ran
    on; written once, atomically, when training starts. `evaluate` and `info`
    rebuild the run from it.
- `metrics.jsonl`: one JSON record per log point, appended by the trainer (read
    here only for `info`).
- the orbax checkpoints (numbered folders), written by the trainer.
- `curves.png` (from the `History` that training returns) and `samples.png`
    (test patches: clean, noisy, denoised).
- `.lock`: held (`fcntl.flock`) by the one `eqx-steps train` that uses the
    folder, and removed when it ends; the kernel releases the lock when that
    process ends, however it ends, so a killed run (which leaves the file) never
    blocks the next one.

In a multi-process run only process 0 writes here (and holds the lock).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import io
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .._io import atomic_write
from ._errors import one_line, UsageError
from ._settings import saved_settings


CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
SAMPLES_FILE = "samples.png"
LOCK_FILE = ".lock"
FILES = (CONFIG_FILE, METRICS_FILE, CURVES_FILE, SAMPLES_FILE)


def default_out(model: str) -> str:
    """A new folder name under `runs/`: `<model>-<date>-<time>[-<n>]`."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{model}-{stamp}")
    out, i = base, 1
    while os.path.exists(out):
        out, i = f"{base}-{i}", i + 1
    return out


def check_new(out: str) -> None:
    """Refuse to start a new run in a file or a non-empty folder."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file, not a folder")
    if os.listdir(out):
        raise UsageError(
            f"run folder {out!r} already exists and is not empty; pass --resume "
            "to continue it, or choose another --out"
        )


def create(run_dir: str) -> bool:
    """Create `run_dir` (and its parents) and check that it is writable; whether
    it is new.

    **Raises:**

    `UsageError` naming the folder when it cannot be created or written to.
    """
    from ..checkpoint import prepare_workdir

    created = not os.path.exists(run_dir)
    try:
        prepare_workdir(run_dir, clean=False)
    except OSError as e:
        raise UsageError(f"run folder {run_dir!r}: {one_line(e)}") from None
    return created


def remove_if_empty(run_dir: str) -> None:
    """Remove `run_dir` when it holds nothing but its lock (a refused new run)."""
    if set(os.listdir(run_dir)) <= {LOCK_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def hold(run_dir: str) -> Iterator[None]:
    """Hold `run_dir/.lock` for the duration of the block: one run at a time.

    The file is removed at the end of the block, while still locked. A process
    that opened it just before finds, once it holds the lock, that the path no
    longer names the file it locked, and starts again with a new file.

    **Raises:**

    `UsageError` when another process holds it (its process id is in the file).
    """
    path = os.path.join(run_dir, LOCK_FILE)
    while True:
        fd = _lock(path, run_dir)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed by the run that held it: lock the new file
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def _lock(path: str, run_dir: str) -> int:
    """Open `path` and lock it (without waiting); the file descriptor."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise UsageError(
            f"run folder {run_dir!r} is in use by another eqx-steps train "
            f"(process {owner}); wait for it to end, or choose another --out"
        ) from None
    return fd


def step_folders(run_dir: str) -> list[int]:
    """The steps of the checkpoints in `run_dir` (its numbered folders), in order."""
    return sorted(
        int(name)
        for name in os.listdir(run_dir)
        if name.isdigit() and os.path.isdir(os.path.join(run_dir, name))
    )


def contents_line(run_dir: str) -> str:
    """What a finished run's folder holds, as the command's last line."""
    files = [f for f in FILES if os.path.exists(os.path.join(run_dir, f))]
    steps = step_folders(run_dir)
    checkpoints = (
        f"; checkpoints in the step folders {', '.join(map(str, steps))}"
        if steps
        else "; no checkpoint"
    )
    if os.path.isdir(os.path.join(run_dir, "stage1")):  # SCICO's two-stage MoDL
        checkpoints += "; the first stage's in stage1"
    return f"Run folder {run_dir}: {', '.join(files)}{checkpoints}"


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path!r}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path!r} does not hold a JSON object")
    return data


def read_config(run_dir: str) -> dict[str, Any]:
    """The whole `config.json` of `run_dir`, checked to come from `eqx-steps train`.

    **Raises:**

    `UsageError` when the folder or the file is missing or not a run's.
    """
    if not os.path.isdir(run_dir):
        raise UsageError(
            f"run folder {run_dir!r} does not exist; give the folder that "
            "`eqx-steps train --out` wrote"
        )
    path = os.path.join(run_dir, CONFIG_FILE)
    config = _read_json(path)
    if "model" not in config:
        raise UsageError(
            f"{path!r} has no 'model' setting: it was not written by `eqx-steps "
            "train`; add the settings of the run to it"
        )
    return config


def read_settings(run_dir: str) -> dict[str, Any]:
    """The settings stored in `run_dir/config.json`, validated like the options."""
    config = read_config(run_dir)
    return saved_settings(config, repr(os.path.join(run_dir, CONFIG_FILE)))


def write_config(run_dir: str, config: Mapping[str, Any]) -> None:
    """Write `run_dir/config.json` (atomically)."""
    data = json.dumps(dict(config), indent=2).encode() + b"\n"
    atomic_write(os.path.join(run_dir, CONFIG_FILE), data)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl` (a damaged line is skipped)."""
    from .._hooks import read_records

    return read_records(os.path.join(run_dir, METRICS_FILE))


def write_curves(run_dir: str, history: Any) -> None:
    """Write `curves.png` from the `History` that training returned (if any)."""
    if history.records:
        history.plot(os.path.join(run_dir, CURVES_FILE))


def show_image(ax: Any, image: np.ndarray, title: str) -> None:
    image = np.clip(np.asarray(image), 0, 1)
    gray = image.shape[-1] == 1
    ax.imshow(
        image[..., 0] if gray else image,
        cmap="gray" if gray else None,
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def write_samples(
    run_dir: str,
    test_ds: Mapping[str, np.ndarray],
    output: np.ndarray,
    snrs: tuple[np.ndarray, np.ndarray],
    title: str,
    count: int = 4,
    names: tuple[str, str, str] = ("clean", "noisy", "denoised"),
) -> None:
    """Write `samples.png`: test patches, one per row: clean, noisy, denoised
    (deblur: truth, blurred, restored; ct: truth, back-projection, restored).

    **Arguments:**

    - `run_dir`: the run folder.
    - `test_ds`: the test set (`"label"` clean, `"image"` noisy).
    - `output`: the denoised test set.
    - `snrs`: the per-patch SNR of the noisy and of the denoised patches.
    - `title`: the figure's title.
    - `count`: how many patches (spread over the test set).
    - `names`: the names of the three columns.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, any backend

    n = len(output)
    rows = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    fig = Figure(figsize=(6.6, 2.15 * len(rows) + 0.5), dpi=90)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    snr_in, snr_out = snrs
    for r, i in enumerate(rows):
        truth, measured, restored = names
        show_image(axes[r][0], test_ds["label"][i], f"{truth} #{i}")
        show_image(axes[r][1], test_ds["image"][i], f"{measured}: {snr_in[i]:.1f} dB")
        show_image(axes[r][2], output[i], f"{restored}: {snr_out[i]:.1f} dB")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(os.path.join(run_dir, SAMPLES_FILE), buf.getvalue())

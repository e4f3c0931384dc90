"""The model on the test set: its outputs and the table the command prints.

Two views of the same test set, side by side:

- per patch: the SNR and PSNR of each noisy and each denoised patch against the
    clean one, averaged over the patches (what a user of the denoiser sees);
- SCICO's evaluation, as the trainer logs it (`eval_loss`, `eval_snr`): the
    metrics of each evaluation batch, averaged over the batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import reported


def eval_batch_size(batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the device count."""
    import jax

    n = jax.device_count()
    return max(n, -(-batch_size // n) * n)


def denoise(
    model: Any,
    model_state: Any,
    test_ds: Mapping[str, np.ndarray],
    batch_size: int,
    backend: str = "pmap",
) -> np.ndarray:
    """The model's output on every test example, in order, on every process.

    **Arguments:**

    - `model`, `model_state`: the trained model and its state.
    - `test_ds`: the test set.
    - `batch_size`: the evaluation batch size (a multiple of the device count).
    - `backend`: the parallel backend (`"sharded"` across processes).

    **Returns:**

    The outputs, one per example of `test_ds`.
    """
    from ..apply import only_apply

    config = {"batch_size": batch_size, "backend": backend}
    with reported():
        outputs, _ = only_apply(
            config, model, test_ds, model_state=model_state, use_checkpoint=False
        )
    return np.asarray(outputs)


def per_patch_quality(
    label: np.ndarray, images: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-patch `(snr, psnr)` of each of `images` against `label`, in dB."""
    import jax

    from ..metrics import psnr, snr

    fn = jax.jit(jax.vmap(lambda r, c: (snr(r, c), psnr(r, c, 1.0))))
    return [tuple(np.asarray(v) for v in fn(label, x)) for x in images]  # pyright: ignore


def scico_line(metrics: Mapping[str, float], batch_size: int, source: str) -> str:
    """The SCICO-defined evaluation figures (`loss`, `snr`), as two lines.

    **Arguments:**

    - `metrics`: the evaluation metrics (`loss`, `snr`; others are left out).
    - `batch_size`: the evaluation batch size they were computed with.
    - `source`: where they come from, e.g. `"last log record, step 8"`.
    """
    cells = [f"eval_loss {metrics['loss']:.4g}" if "loss" in metrics else ""]
    cells.append(f"eval_snr {metrics['snr']:.2f} dB" if "snr" in metrics else "")
    return (
        f"SCICO-defined evaluation ({source}; metrics per batch of {batch_size}, "
        f"averaged over batches):\n  " + "  ".join(c for c in cells if c)
    )


def summary(
    settings: Mapping[str, Any],
    test_ds: Mapping[str, np.ndarray],
    output: np.ndarray,
    scico: str | None,
) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """The printed table and the per-patch SNRs (noisy input, output).

    **Arguments:**

    - `settings`: the run's settings (`patch`, `noise`).
    - `test_ds`: the test set.
    - `output`: the model's output on it.
    - `scico`: the line of SCICO-defined figures ([`scico_line`]), or `None`.
    """
    (snr_in, psnr_in), (snr_out, psnr_out) = per_patch_quality(
        test_ds["label"], [test_ds["image"], output]
    )
    rows = (
        ("noisy input", np.mean(snr_in), np.mean(psnr_in), ""),
        ("denoised", np.mean(snr_out), np.mean(psnr_out), ""),
        (
            "improvement",
            np.mean(snr_out) - np.mean(snr_in),
            np.mean(psnr_out) - np.mean(psnr_in),
            "+",
        ),
    )
    n, p = len(output), settings["patch"]
    lines = [
        f"Test set: {n} patches of {p}x{p}, noise std {settings['noise']:g} "
        "(PSNR with peak 1)",
        f"  {'mean over patches':<19}{'SNR (dB)':>10}{'PSNR (dB)':>11}",
        *(f"  {name:<19}{s:>{sign}10.2f}{q:>{sign}11.2f}" for name, s, q, sign in rows),
    ]
    if scico:
        lines.append(scico)
    return "\n".join(lines), (snr_in, snr_out)

"""The model on the test set: its outputs and the table the command prints.

One headline figure, the **test SNR**: SCICO's evaluation, the `eval_snr` that
the trainer logs at every log point (the progress bar, `metrics.jsonl`,
`curves.png`, `eqx-steps info`): the SNR of each per-device batch (one signal
power and one error over the whole batch), averaged over the batches. The table
gives it, with the PSNR and the MSE on the same definition, for the noisy input
and for the denoised output, so that the improvement is read on one scale.

Below it, labelled as such, the mean of per-patch SNRs: each patch counts once,
and a low-contrast patch (small signal variance) pulls it down, so it reads
lower than the test SNR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import reported


def plural(count: int, noun: str) -> str:
    """`"1 epoch"`, `"3 epochs"`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


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


def _metrics(output: Any, label: Any, criterion: Any) -> dict[str, Any]:
    """The trainer's metrics (`loss`, `snr`) and the PSNR with peak 1."""
    from ..metrics import compute_metrics, psnr

    return {
        **compute_metrics(output, label, criterion),
        "psnr": psnr(label, output, 1.0),
    }


def _given_output_step(
    state: Any,
    batch: Mapping[str, Any],
    criterion: Any = None,
    metrics_fn: Any = None,
    *,
    axis_name: Any = "device",
) -> dict[str, Any]:
    """`eval_step` with `batch["image"]` in place of the model's output."""
    import jax

    metrics = metrics_fn(batch["image"], batch["label"], criterion)  # pyright: ignore
    return metrics if axis_name is None else jax.lax.pmean(metrics, axis_name)


def scico_evaluation(
    model: Any,
    model_state: Any,
    label: np.ndarray,
    prediction: np.ndarray,
    batch_size: int,
    backend: str = "pmap",
) -> dict[str, float]:
    """`loss` (MSE), `snr` and `psnr` of `prediction` by the trainer's definition.

    The batches and the averaging of [`eqx_steps.only_evaluate`][] (so `snr` is
    the `eval_snr` the trainer logs for the model whose outputs `prediction`
    are), with `prediction` (the noisy input, or the model's output) in place of
    the model's output. `model` only gives the state its structure.
    """
    from ..apply import only_evaluate

    config = {
        "batch_size": batch_size,
        "backend": backend,
        "metrics_fn": _metrics,
        "eval_step_fn": _given_output_step,
    }
    with reported():
        return only_evaluate(
            config,
            model,
            {"image": prediction, "label": label},
            model_state=model_state,
            use_checkpoint=False,
        )


def per_patch_quality(
    label: np.ndarray, images: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-patch `(snr, psnr)` of each of `images` against `label`, in dB."""
    import jax

    from ..metrics import psnr, snr

    fn = jax.jit(jax.vmap(lambda r, c: (snr(r, c), psnr(r, c, 1.0))))
    return [tuple(np.asarray(v) for v in fn(label, x)) for x in images]  # pyright: ignore


def summary(
    settings: Mapping[str, Any],
    test_ds: Mapping[str, np.ndarray],
    output: np.ndarray,
    evaluations: tuple[Mapping[str, float], Mapping[str, float]],
    batch_size: int,
    step: int,
) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """The printed table and the per-patch SNRs (noisy input, output).

    **Arguments:**

    - `settings`: the run's settings (`patch`, `noise`).
    - `test_ds`: the test set.
    - `output`: the model's output on it.
    - `evaluations`: [`scico_evaluation`][] of the noisy input and of `output`.
    - `batch_size`: the evaluation batch size they were computed with.
    - `step`: the step of the model.
    """
    import jax

    (snr_in, _), (snr_out, _) = per_patch_quality(
        test_ds["label"], [test_ds["image"], output]
    )
    noisy, denoised = evaluations
    n, p, devices = len(output), settings["patch"], jax.device_count()
    task = settings.get("task", "denoise")
    first, second = ("noisy input", "denoised")
    if task == "deblur":
        first, second = ("blurred input", "restored")
    elif task == "ct":
        first, second = ("back-proj.", "restored")
    width = max(12, len(first) + 2)

    def row(name: str, a: float, b: float, fmt: str, gain: bool = True) -> str:
        change = f"{b - a:>+13.2f}" if gain else ""
        return f"  {name:<28}{a:>{width}{fmt}}{b:>11{fmt}}{change}"

    what = "patches"
    if task != "denoise":
        from ._tasks import describe

        what = f"patches ({describe(settings)})"
    lines = [
        f"Test set: {n} {what} of {p}x{p}, noise std {settings['noise']:g}; the "
        f"model at step {step}",
        f"  {'':<28}{first:>{width}}{second:>11}{'improvement':>13}",
        row("test SNR (dB)", noisy["snr"], denoised["snr"], ".2f"),
        row("test PSNR (dB, peak 1)", noisy["psnr"], denoised["psnr"], ".2f"),
        row("test MSE", noisy["loss"], denoised["loss"], ".5f", gain=False),
        row(
            "mean of per-patch SNRs (dB)",
            float(np.mean(snr_in)),
            float(np.mean(snr_out)),
            ".2f",
        ),
        "Test SNR, PSNR and MSE: SCICO's evaluation, as eval_snr and eval_loss in the "
        "log, metrics.jsonl",
        f"and curves.png (each over a device's batch of {batch_size // devices}: "
        f"batch {batch_size} on {devices} device(s); averaged over the batches).",
        "The mean of per-patch SNRs counts each patch once; low-contrast patches "
        "pull it down.",
    ]
    if task == "ct":
        lines.append(
            "back-proj.: the back-projection A^T y of each sinogram, scaled by one "
            "factor fitted to the truths (least squares)."
        )
    return "\n".join(lines), (snr_in, snr_out)


def report(
    settings: Mapping[str, Any],
    test_ds: Mapping[str, np.ndarray],
    model: Any,
    model_state: Any,
    batch_size: int,
    backend: str,
    step: int,
) -> tuple[str, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The model on the test set: the printed table ([`summary`][]), the outputs
    and the per-patch SNRs (noisy input, or the task's measurement as an image;
    output)."""
    from ._task_data import reference

    output = denoise(model, model_state, test_ds, batch_size, backend)
    # The measurement as an image (deblur: the blurred one; ct: A^T y, scaled).
    shown = {
        "image": reference(settings, test_ds["image"], test_ds["label"]),
        "label": test_ds["label"],
    }
    evaluations = tuple(
        scico_evaluation(model, model_state, test_ds["label"], x, batch_size, backend)
        for x in (shown["image"], output)
    )
    text, snrs = summary(settings, shown, output, evaluations, batch_size, step)  # pyright: ignore
    return text, output, snrs

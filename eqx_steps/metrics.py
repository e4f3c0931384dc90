"""Quality metrics: SNR, PSNR and the per-device metrics functions of the steps.

`compute_metrics` (loss and SNR) serves denoising and regression models,
`classification_metrics` (loss and accuracy) classifiers. The definitions of the
first are SCICO's (`scico.metric.snr`, `scico.metric.psnr` and
`scico.flax.train.diagnostics.compute_metrics`).
"""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Inexact, Int

from .losses import _check_classification, cross_entropy_loss, mse_loss


def _check_same_shape(fn: str, reference: Array, comparison: Array) -> None:
    if reference.shape != comparison.shape:
        raise ValueError(
            f"{fn}: `reference` has shape {reference.shape} but `comparison` has "
            f"shape {comparison.shape}; pass two signals of the same shape."
        )


def _mse(reference: Array, comparison: Array) -> Float[Array, ""]:
    # scico.metric.mse: the plain (not halved) mean squared error, |.|^2 for complex.
    return jnp.mean(jnp.abs(reference - comparison) ** 2)


def snr(
    reference: Inexact[ArrayLike, "*shape"], comparison: Inexact[ArrayLike, "*shape"]
) -> Float[Array, ""]:
    """Signal-to-noise ratio of `comparison` with respect to `reference`, in dB.

    SCICO's definition:

        snr = 10 * log10(var(reference) / mean(|reference - comparison| ** 2))

    The signal power is the *variance* of the reference (its mean is not
    signal), and the whole array is one signal: for a batch, the variance and
    the error are taken over every element, not per example. It is invariant
    to a common offset of both signals and to a common scaling of both.

    Identical signals give `+inf` (and a constant reference identical to the
    comparison gives `nan`, `0 / 0`), as in SCICO; no error is raised, so the
    function stays traceable.

    **Arguments:**

    - `reference`: the reference (ground truth) signal.
    - `comparison`: the signal to assess, of the same shape.

    **Returns:**

    The SNR in decibels, a scalar.
    """
    reference = jnp.asarray(reference)
    comparison = jnp.asarray(comparison)
    _check_same_shape("snr", reference, comparison)
    return 10.0 * jnp.log10(jnp.var(reference) / _mse(reference, comparison))


def psnr(
    reference: Inexact[ArrayLike, "*shape"],
    comparison: Inexact[ArrayLike, "*shape"],
    signal_range: float | Float[ArrayLike, ""] | None = None,
) -> Float[Array, ""]:
    """Peak signal-to-noise ratio of `comparison` with respect to `reference`, in dB.

    SCICO's definition:

        psnr = 10 * log10(signal_range ** 2 / mean(|reference - comparison| ** 2))

    By default `signal_range` is the *actual* range of the reference,
    `|max(reference) - min(reference)|`, not the range of its data type (SCICO's
    "less common definition"); pass e.g. `signal_range=1.0` for images in
    `[0, 1]` or `255` for 8-bit samples.

    **Arguments:**

    - `reference`: the reference (ground truth) signal.
    - `comparison`: the signal to assess, of the same shape.
    - `signal_range`: the peak-to-peak range of the signal, or `None` (default)
        for the range of `reference`.

    **Returns:**

    The PSNR in decibels, a scalar (`+inf` for identical signals).
    """
    reference = jnp.asarray(reference)
    comparison = jnp.asarray(comparison)
    _check_same_shape("psnr", reference, comparison)
    if signal_range is None:
        signal_range = jnp.abs(jnp.max(reference) - jnp.min(reference))
    return 10.0 * jnp.log10(signal_range**2 / _mse(reference, comparison))


def compute_metrics(
    output: Float[Array, "*shape"],
    labels: Float[Array, "*shape"],
    criterion: Callable[[Array, Array], Float[Array, ""]] = mse_loss,
) -> dict[str, Float[Array, ""]]:
    """The diagnostic metrics of one (per-device) batch: loss and SNR.

    A pure per-device function: unlike SCICO's `compute_metrics` it does no
    `pmean`; the steps average its result over the device axis. As in SCICO, the
    SNR is `snr(labels, output)` over the whole per-device batch (one variance
    and one error over all its elements), not a mean of per-example SNRs.

    **Arguments:**

    - `output`: the model's prediction for the batch.
    - `labels`: the targets, of the same shape.
    - `criterion`: the loss `criterion(output, labels) -> scalar`; default
        `mse_loss`.

    **Returns:**

    `{"loss": criterion(output, labels), "snr": snr(labels, output)}`.
    """
    return {"loss": criterion(output, labels), "snr": snr(labels, output)}


def classification_metrics(
    output: Float[Array, "*batch classes"],
    labels: Int[Array, "*batch"],
    criterion: Callable[[Array, Array], Float[Array, ""]] = cross_entropy_loss,
) -> dict[str, Float[Array, ""]]:
    """The diagnostic metrics of one (per-device) batch of a classifier: loss and
    accuracy.

    The `metrics_fn` of a classifier, as [`eqx_steps.compute_metrics`][] is for a
    denoiser: a pure per-device function whose result the steps average over the
    device axis. The accuracy is the fraction of examples whose largest logit is
    at their label (ties go to the first class, as `jnp.argmax`).

    **Arguments:**

    - `output`: the model's logits, classes on the last axis, e.g.
        `(batch, classes)`.
    - `labels`: the integer class of each example, of shape `output.shape[:-1]`.
    - `criterion`: the loss `criterion(output, labels) -> scalar`; default
        [`eqx_steps.cross_entropy_loss`][].

    **Returns:**

    `{"loss": criterion(output, labels), "accuracy": mean(argmax(output, -1) ==
    labels)}`, the accuracy in `[0, 1]`.
    """
    logits, labels = _check_classification("classification_metrics", output, labels)
    correct = jnp.argmax(logits, axis=-1) == labels
    return {
        "loss": criterion(output, labels),
        "accuracy": jnp.mean(correct.astype(jnp.float32)),
    }

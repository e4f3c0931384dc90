"""Loss functions for model optimisation (SCICO's `scico.flax.train.losses`)."""

import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Float, Int


def mse_loss(
    output: Float[ArrayLike, "*shape"], labels: Float[ArrayLike, "*shape"]
) -> Float[Array, ""]:
    """Mean squared error loss, as SCICO defines it for training.

    This is the mean of `optax.l2_loss`, that is **half** the mean squared
    error: `0.5 * mean((output - labels) ** 2)`. The factor of one half is
    SCICO's (and optax's `l2_loss`) convention; it scales the gradient, not the
    minimiser. Coming from a plain Equinox loop with
    `jnp.mean((pred - y) ** 2)`, the same learning rate trains at half the speed
    under SGD (Adam is unaffected): use [`eqx_steps.mean_squared_error`][] there.

    **Arguments:**

    - `output`: the model's prediction.
    - `labels`: the reference signal, of the same shape as `output`.

    **Returns:**

    A scalar: `mean(0.5 * (output - labels) ** 2)`.

    **Raises:**

    - `ValueError`: if `output` and `labels` have different shapes (no
        broadcasting, which would silently compute a different loss).
    """
    output = jnp.asarray(output)
    labels = jnp.asarray(labels)
    if output.shape != labels.shape:
        raise ValueError(
            f"mse_loss: `output` has shape {output.shape} but `labels` has shape "
            f"{labels.shape}; pass a prediction and a target of the same shape."
        )
    return jnp.mean(optax.l2_loss(output, labels))


def mean_squared_error(
    output: Float[ArrayLike, "*shape"], labels: Float[ArrayLike, "*shape"]
) -> Float[Array, ""]:
    """The full mean squared error, `mean((output - labels) ** 2)`.

    Twice [`eqx_steps.mse_loss`][] (SCICO's half-MSE): the loss a plain Equinox
    or optax loop usually writes, `jnp.mean((pred - y) ** 2)`. Pass it as
    `config["criterion"]` to train with the gradients such a loop computes.

    **Arguments:**

    - `output`: the model's prediction.
    - `labels`: the reference signal, of the same shape as `output`.

    **Returns:**

    A scalar: `mean((output - labels) ** 2)`.

    **Raises:**

    - `ValueError`: if `output` and `labels` have different shapes.
    """
    output = jnp.asarray(output)
    labels = jnp.asarray(labels)
    if output.shape != labels.shape:
        raise ValueError(
            f"mean_squared_error: `output` has shape {output.shape} but `labels` has "
            f"shape {labels.shape}; pass a prediction and a target of the same shape."
        )
    return jnp.mean(optax.squared_error(output, labels))


def cross_entropy_loss(
    logits: Float[ArrayLike, "*batch classes"], labels: Int[ArrayLike, "*batch"]
) -> Float[Array, ""]:
    """Softmax cross-entropy with integer class labels, averaged over the batch.

    The mean of `optax.softmax_cross_entropy_with_integer_labels`: for each example
    `logsumexp(logits) - logits[label]`, computed stably from unnormalised
    logits. The criterion of a classifier, beside [`eqx_steps.mse_loss`][] for a
    regression or denoising model; pair it with
    [`eqx_steps.classification_metrics`][].

    **Arguments:**

    - `logits`: the model's unnormalised class scores, classes on the last axis,
        e.g. `(batch, classes)`.
    - `labels`: the integer class of each example, in `[0, classes)`, of shape
        `logits.shape[:-1]`, e.g. `(batch,)`.

    **Returns:**

    A scalar: the mean over all examples of the cross-entropy.

    **Raises:**

    - `TypeError`: if `labels` is not an integer array (one-hot or float labels:
        pass `jnp.argmax(one_hot, -1)` or `labels.astype(int)`).
    - `ValueError`: if `labels` does not have the shape `logits.shape[:-1]`.
    """
    logits, labels = _check_classification("cross_entropy_loss", logits, labels)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _check_classification(fn: str, logits: ArrayLike, labels: ArrayLike):
    """`logits` and `labels` as arrays, checked to be a classifier's output and its
    integer labels."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: `labels` must hold integer class indices, got dtype "
            f"{labels.dtype}; pass `labels.astype(int)` (or `jnp.argmax(one_hot, -1)` "
            "for one-hot labels)."
        )
    if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{fn}: `logits` has shape {logits.shape} and `labels` has shape "
            f"{labels.shape}; pass logits of shape (..., classes) and one integer "
            "label per example, of shape logits.shape[:-1]."
        )
    return logits, labels

"""Loss functions for model optimisation (SCICO's `scico.flax.train.losses`)."""

import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Float


def mse_loss(
    output: Float[ArrayLike, "*shape"], labels: Float[ArrayLike, "*shape"]
) -> Float[Array, ""]:
    """Mean squared error loss, as SCICO defines it for training.

    This is the mean of `optax.l2_loss`, that is **half** the mean squared
    error: `0.5 * mean((output - labels) ** 2)`. The factor of one half is
    SCICO's (and optax's) convention; it scales the gradient, not the minimiser.

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

"""`eqx_steps.synthetic.with_input_noise`: fresh, seeded noise inside the step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_steps as es
from eqx_steps.synthetic import with_input_noise


STD = 0.1


class Identity(eqx.Module):
    weight: jax.Array

    def __call__(self, x):
        return self.weight * x


def _metrics(output, label, criterion):
    # The noise itself (the label is zero, the model the identity): its mean
    # square, and the first pixel of the first example and its square, averaged
    # over the devices by the step.
    first = output[0, 0, 0, 0]
    return {"loss": criterion(output, label), "first": first, "first2": first**2}


_STEP = es.parallel_train_step(
    lambda step: 0.0,
    es.mse_loss,
    _metrics,
    train_step_fn=with_input_noise(STD, seed=3),
)
_STATE = es.TrainState.create(Identity(jnp.ones(())), optax.sgd(0.0))
_CLEAN = np.zeros((4 * 2, 8, 8, 1), np.float32)
_BATCH = es.shard({"image": _CLEAN, "label": _CLEAN})


def _run(state):
    state, metrics = _STEP(state, _BATCH)
    return state, {k: float(v) for k, v in metrics.items()}


def test_noise_is_fresh_at_every_step_and_repeats_on_resume():
    state1, first = _run(_STATE)
    _, again = _run(_STATE)  # the same state (a resumed run): the same noise
    _, second = _run(state1)  # the next step: new noise
    assert first == again
    assert first["first"] != second["first"]
    for m in (first, second):
        assert m["loss"] == pytest.approx(0.5 * STD**2, rel=0.25)  # mean(0.5 z**2)
        # Devices draw different noise: the mean of the squares exceeds the
        # square of the mean.
        assert m["first2"] > m["first"] ** 2 + 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise_std"):
        with_input_noise(-1.0)
    with pytest.raises(TypeError, match="seed"):
        with_input_noise(0.1, seed=1.5)  # pyright: ignore[reportArgumentType]

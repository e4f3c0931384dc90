"""A layer that collects over an axis name the step does not bind: one clear error."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqx_steps as es


class _Net(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, axis_name, key):
        self.linear = eqx.nn.Linear(3, 3, key=key)
        self.norm = eqx.nn.BatchNorm(3, axis_name=axis_name, mode="batch")

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


def _state(axis_name):
    model, model_state = eqx.nn.make_with_state(_Net)(axis_name, jax.random.key(0))
    return es.TrainState.create(model, optax.sgd(0.1), model_state=model_state)


_BATCH = {"image": jnp.ones((8, 3)), "label": jnp.zeros((8, 3))}
_LR = optax.constant_schedule(0.1)


@pytest.fixture(scope="module")
def parallel_step():
    return es.parallel_train_step(_LR, es.mse_loss, es.compute_metrics)


@pytest.mark.parametrize(
    "axis_name, words",
    [
        ("i", "collects over the axis name 'i', which this step does not define"),
        ("device", "collects without the examples' axis 'batch'"),
        (("device", "i"), "collects over the axis name 'i'"),
    ],
)
def test_a_parallel_step_names_the_layer_and_the_axis_names(
    parallel_step, axis_name, words
):
    with pytest.raises(ValueError) as info:
        parallel_step(_state(axis_name), es.shard(_BATCH))
    msg = str(info.value)
    assert f"layer `norm` (BatchNorm, axis_name={axis_name!r})" in msg
    assert words in msg
    assert "The axis names are 'batch'" in msg and "'device'" in msg
    assert 'axis_name="batch" for per-device statistics' in msg
    assert 'axis_name=("device", "batch") for statistics synchronised' in msg


def test_a_single_device_step_says_only_batch_exists():
    with pytest.raises(ValueError, match="The only axis name is 'batch'"):
        es.train_step(
            _state(("device", "batch")),
            _BATCH,
            _LR,
            es.mse_loss,
            es.compute_metrics,
            axis_name=None,
        )


@pytest.mark.parametrize("axis_name", ["batch", ("device", "batch")])
def test_the_valid_choices_train(parallel_step, axis_name):
    state, metrics = parallel_step(_state(axis_name), es.shard(_BATCH))
    assert int(state.step) == 1 and jnp.isfinite(metrics["loss"])

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ADAM, mlp, tree_equal

import eqx_steps as es


def test_create_starts_at_step_zero_int32():
    state = es.TrainState.create(mlp(), ADAM)
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert int(state.step) == 0
    assert state.key is None and state.model_state is None
    assert state.forward is es.per_example


def test_state_is_immutable():
    state = es.TrainState.create(mlp(), ADAM)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = jnp.array(3)  # pyright: ignore


def test_apply_gradients_advances_step_and_replace_changes_fields():
    state = es.TrainState.create(mlp(), optax.sgd(0.1))
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads)
    assert int(new.step) == 1
    w0, w1 = state.model.layers[0].weight, new.model.layers[0].weight
    np.testing.assert_allclose(w1, w0 - 0.1, rtol=1e-6)
    replaced = new.replace(step=jnp.array(7, jnp.int32))
    assert int(replaced.step) == 7 and int(new.step) == 1


def test_only_trainable_leaves_get_optimizer_state_and_change():
    model = mlp()
    # Freeze the first layer.
    spec = jax.tree_util.tree_map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias), spec, replace=(False, False)
    )
    state = es.TrainState.create(model, optax.adam(0.1), trainable=spec)
    mu = state.opt_state[0].mu
    assert mu.layers[0].weight is None and mu.layers[1].weight is not None
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads)
    assert tree_equal(new.model.layers[0], model.layers[0])
    assert not np.allclose(new.model.layers[1].weight, model.layers[1].weight)


@pytest.mark.parametrize("opt_type", ["SGD", "ADAM", "ADAMW"])
def test_create_basic_train_state_matches_optax(opt_type):
    config = {"opt_type": opt_type, "momentum": 0.9}
    state = es.create_basic_train_state(config, mlp(), 0.01)
    expected = {
        "SGD": optax.sgd(0.01, momentum=0.9, nesterov=True),
        "ADAM": optax.adam(0.01),
        "ADAMW": optax.adamw(0.01),
    }[opt_type]
    grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
    ours, _ = state.tx.update(grads, state.opt_state, state.params)
    theirs, _ = expected.update(grads, expected.init(state.params), state.params)
    assert tree_equal(ours, theirs)


def test_create_basic_train_state_defaults_to_adam_and_plain_sgd():
    s = es.create_basic_train_state({}, mlp(), 0.01)
    assert isinstance(s.opt_state[0], optax.ScaleByAdamState)
    s = es.create_basic_train_state({"opt_type": "SGD"}, mlp(), 0.01)
    # Plain SGD without momentum keeps no trace.
    assert not any(
        isinstance(x, optax.TraceState)
        for x in jax.tree_util.tree_leaves(
            s.opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState)
        )
    )


def test_unknown_opt_type_is_refused():
    with pytest.raises(ValueError, match="opt_type.*'RMSPROP'.*SGD") as info:
        es.create_basic_train_state({"opt_type": "RMSPROP"}, mlp(), 0.01)
    # SCICO raises NotImplementedError: code catching either keeps working.
    assert isinstance(info.value, NotImplementedError)


def test_bad_tx_and_key_are_refused():
    with pytest.raises(TypeError, match="`tx`"):
        es.TrainState.create(mlp(), 0.01)  # pyright: ignore
    with pytest.raises(TypeError, match="`key`"):
        es.TrainState.create(mlp(), ADAM, key=3)  # pyright: ignore

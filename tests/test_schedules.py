"""Tests of the learning-rate schedules against SCICO's definitions."""

import dataclasses
import math
from typing import TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import eqx_steps as es
from eqx_steps import (
    as_schedule,
    create_cnst_lr_schedule,
    create_cosine_lr_schedule,
    create_exp_lr_schedule,
)


# Verbatim recipes of scico 0.0.7 scico/flax/train/learning_rate.py.
def _scico_exp(config):
    decay_steps = config["num_epochs"] * config["steps_per_epoch"]
    return optax.exponential_decay(
        config["base_learning_rate"], decay_steps, config["lr_decay_rate"]
    )


def _scico_cosine(config):
    warmup_fn = optax.linear_schedule(
        init_value=0.0,
        end_value=config["base_learning_rate"],
        transition_steps=config["warmup_epochs"] * config["steps_per_epoch"],
    )
    cosine_epochs = max(config["num_epochs"] - config["warmup_epochs"], 1)
    cosine_fn = optax.cosine_decay_schedule(
        init_value=config["base_learning_rate"],
        decay_steps=cosine_epochs * config["steps_per_epoch"],
    )
    return optax.join_schedules(
        schedules=[warmup_fn, cosine_fn],
        boundaries=[config["warmup_epochs"] * config["steps_per_epoch"]],
    )


def _at(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_constant_schedule():
    schedule = create_cnst_lr_schedule({"base_learning_rate": 0.03, "num_epochs": 5})
    np.testing.assert_allclose(_at(schedule, [0, 1, 10, 10_000]), 0.03, rtol=1e-7)


def test_exponential_schedule_hand_computed():
    config = {
        "base_learning_rate": 0.1,
        "num_epochs": 2,
        "steps_per_epoch": 5,
        "lr_decay_rate": 0.5,
    }
    schedule = create_exp_lr_schedule(config)
    # lr = 0.1 * 0.5 ** (step / 10): the rate is over the whole run, not per epoch
    expected = [0.1, 0.1 * 0.5**0.1, 0.1 * 0.5**0.5, 0.05, 0.025]
    np.testing.assert_allclose(_at(schedule, [0, 1, 5, 10, 20]), expected, rtol=1e-6)


def test_cosine_schedule_hand_computed():
    config = {
        "base_learning_rate": 1.0,
        "num_epochs": 6,
        "warmup_epochs": 2,
        "steps_per_epoch": 5,
    }
    schedule = create_cosine_lr_schedule(config)
    # warm-up over 10 steps from 0, then cosine over (6 - 2) * 5 = 20 steps
    steps = [0, 1, 5, 9, 10, 15, 20, 30, 40]
    expected = [
        0.0,
        0.1,
        0.5,
        0.9,
        1.0,
        0.5 * (1 + math.cos(math.pi * 5 / 20)),
        0.5,
        0.0,
        0.0,
    ]
    np.testing.assert_allclose(_at(schedule, steps), expected, rtol=1e-6, atol=1e-7)


def test_cosine_schedule_without_warmup_and_with_long_warmup():
    no_warmup = create_cosine_lr_schedule(
        {
            "base_learning_rate": 2.0,
            "num_epochs": 2,
            "warmup_epochs": 0,
            "steps_per_epoch": 4,
        }
    )
    np.testing.assert_allclose(
        _at(no_warmup, [0, 4, 8, 12]), [2.0, 1.0, 0.0, 0.0], rtol=1e-6, atol=1e-7
    )
    # warmup_epochs >= num_epochs: SCICO still gives the cosine stage one epoch
    long = create_cosine_lr_schedule(
        {
            "base_learning_rate": 1.0,
            "num_epochs": 2,
            "warmup_epochs": 3,
            "steps_per_epoch": 2,
        }
    )
    np.testing.assert_allclose(
        _at(long, [0, 3, 6, 7, 8]), [0.0, 0.5, 1.0, 0.5, 0.0], rtol=1e-6, atol=1e-7
    )


@given(
    lr=st.sampled_from([1e-4, 1e-3, 0.5]),
    num_epochs=st.integers(1, 30),
    warmup_epochs=st.integers(0, 10),
    steps_per_epoch=st.integers(1, 50),
    decay=st.sampled_from([0.1, 0.5, 0.95, 1.0]),
)
def test_schedules_equal_scico_recipes(
    lr, num_epochs, warmup_epochs, steps_per_epoch, decay
):
    config = {
        "base_learning_rate": lr,
        "num_epochs": num_epochs,
        "warmup_epochs": warmup_epochs,
        "steps_per_epoch": steps_per_epoch,
        "lr_decay_rate": decay,
    }
    total = num_epochs * steps_per_epoch
    steps = sorted(
        {0, 1, warmup_epochs * steps_per_epoch, total // 2, total, 2 * total}
    )
    np.testing.assert_allclose(
        _at(create_exp_lr_schedule(config), steps), _at(_scico_exp(config), steps)
    )
    np.testing.assert_allclose(
        _at(create_cosine_lr_schedule(config), steps), _at(_scico_cosine(config), steps)
    )
    cosine = _at(create_cosine_lr_schedule(config), steps)
    assert np.all(cosine >= 0) and np.all(cosine <= lr * (1 + 1e-6))


def test_schedules_trace_under_jit():
    config = {
        "base_learning_rate": 0.1,
        "num_epochs": 3,
        "warmup_epochs": 1,
        "steps_per_epoch": 4,
        "lr_decay_rate": 0.9,
    }
    for make in (
        create_cnst_lr_schedule,
        create_exp_lr_schedule,
        create_cosine_lr_schedule,
    ):
        schedule = make(config)
        jitted = jax.jit(schedule)
        for step in (0, 2, 4, 7, 12):
            np.testing.assert_allclose(
                jitted(jnp.asarray(step, jnp.int32)), schedule(step), rtol=1e-6
            )


class _Config(TypedDict, total=False):
    base_learning_rate: float
    num_epochs: int
    steps_per_epoch: int
    warmup_epochs: int
    lr_decay_rate: float


@dataclasses.dataclass(frozen=True)
class _DataclassConfig:
    base_learning_rate: float = 0.2
    num_epochs: int = 2
    steps_per_epoch: int = 3
    warmup_epochs: int = 1
    lr_decay_rate: float = 0.5


def test_typed_dict_and_dataclass_configs():
    typed: _Config = {
        "base_learning_rate": 0.2,
        "num_epochs": 2,
        "steps_per_epoch": 3,
        "warmup_epochs": 1,
        "lr_decay_rate": 0.5,
    }
    for config in (typed, _DataclassConfig()):
        np.testing.assert_allclose(create_exp_lr_schedule(config)(6), 0.1, rtol=1e-6)  # pyright: ignore
        np.testing.assert_allclose(create_cosine_lr_schedule(config)(3), 0.2, rtol=1e-6)  # pyright: ignore


_FULL = {
    "base_learning_rate": 0.1,
    "num_epochs": 3,
    "steps_per_epoch": 4,
    "warmup_epochs": 1,
    "lr_decay_rate": 0.9,
}
_NEEDS = [
    (create_cnst_lr_schedule, "base_learning_rate"),
    (create_exp_lr_schedule, "base_learning_rate"),
    (create_exp_lr_schedule, "num_epochs"),
    (create_exp_lr_schedule, "steps_per_epoch"),
    (create_exp_lr_schedule, "lr_decay_rate"),
    (create_cosine_lr_schedule, "base_learning_rate"),
    (create_cosine_lr_schedule, "num_epochs"),
    (create_cosine_lr_schedule, "steps_per_epoch"),
    (create_cosine_lr_schedule, "warmup_epochs"),
]


@pytest.mark.parametrize(
    "make, key", _NEEDS, ids=[f"{m.__name__}-{k}" for m, k in _NEEDS]
)
def test_missing_key_raises_naming_key_and_schedule(make, key):
    config = {k: v for k, v in _FULL.items() if k != key}
    with pytest.raises(KeyError, match=rf"{make.__name__}.*'{key}'"):
        make(config)


@pytest.mark.parametrize(
    "make, key, value, error",
    [
        (create_exp_lr_schedule, "steps_per_epoch", 0, ValueError),
        (create_exp_lr_schedule, "steps_per_epoch", 2.5, TypeError),
        (create_cosine_lr_schedule, "steps_per_epoch", 0, ValueError),
        (create_cosine_lr_schedule, "warmup_epochs", -1, ValueError),
        (create_cosine_lr_schedule, "num_epochs", 0, ValueError),
        (create_exp_lr_schedule, "lr_decay_rate", 0.0, ValueError),
        (create_cnst_lr_schedule, "base_learning_rate", "0.1", TypeError),
        (create_cnst_lr_schedule, "base_learning_rate", float("nan"), ValueError),
        (create_cnst_lr_schedule, "base_learning_rate", True, TypeError),
    ],
)
def test_bad_values_raise_naming_key(make, key, value, error):
    with pytest.raises(error, match=rf"{make.__name__}.*'{key}'"):
        make({**_FULL, key: value})


def test_config_not_a_mapping_raises():
    with pytest.raises(TypeError, match="`config` must be a mapping"):
        create_cnst_lr_schedule(0.1)  # pyright: ignore[reportArgumentType]


# ---------------------------------------------------------------------------
# A constant learning rate wherever a schedule is taken


def test_as_schedule_makes_a_number_constant_and_keeps_a_schedule():
    schedule = create_exp_lr_schedule(_FULL)
    assert as_schedule(schedule) is schedule
    assert as_schedule(None) is None
    for lr in (0.03, 1, np.float32(0.03), jnp.asarray(0.03)):
        np.testing.assert_allclose(_at(as_schedule(lr), [0, 7, 10_000]), float(lr))


@pytest.mark.parametrize(
    "value, error",
    [
        ("0.1", TypeError),
        (True, TypeError),
        ([0.1], TypeError),
        (-1e-3, ValueError),
        (float("inf"), ValueError),
    ],
)
def test_as_schedule_bad_values_name_the_argument(value, error):
    with pytest.raises(error, match="`learning_rate_fn`"):
        as_schedule(value)


_LINEAR = eqx.nn.Linear(3, 2, key=jax.random.key(0))
_TX = optax.sgd(0.05)
_BATCH = {
    "image": np.linspace(-1, 1, 4 * 8 * 3, dtype=np.float32).reshape(4, 8, 3),
    "label": np.linspace(0, 1, 4 * 8 * 2, dtype=np.float32).reshape(4, 8, 2),
}


def test_train_step_and_parallel_train_step_take_a_float():
    state = es.TrainState.create(_LINEAR, _TX)
    one = {k: v[0] for k, v in _BATCH.items()}

    @eqx.filter_jit
    def step(state, lr):
        return es.train_step(
            state, one, lr, es.mse_loss, es.compute_metrics, axis_name=None
        )

    by_float, metrics = step(state, 0.05)
    by_schedule, expected = step(state, optax.constant_schedule(0.05))
    assert eqx.tree_equal(by_float, by_schedule)
    assert float(metrics["learning_rate"]) == float(expected["learning_rate"])
    np.testing.assert_allclose(float(metrics["learning_rate"]), 0.05, rtol=1e-7)

    parallel = es.parallel_train_step(0.05, es.mse_loss, es.compute_metrics)
    new, metrics = parallel(state, _BATCH)
    np.testing.assert_allclose(float(metrics["learning_rate"]), 0.05, rtol=1e-7)
    assert int(new.step) == 1
    # create_basic_train_state builds its optimizer with the constant as well.
    created = es.create_basic_train_state({"opt_type": "SGD"}, _LINEAR, 0.05)
    assert eqx.tree_equal(step(created, 0.05)[0].model, by_float.model)

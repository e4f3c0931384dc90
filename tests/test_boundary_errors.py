"""Bad inputs raise at the public boundary, before compiling, an error that names
the argument, the value and the fix (issue 15): never an error from inside JAX."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ADAM, bn_net, loss_metrics, lr_fn, mlp, mse, regression_batch

import eqx_steps as es


STEP = es.parallel_train_step(lr_fn, mse, loss_metrics)  # built once, shared


@functools.cache
def mlp_state():
    return es.TrainState.create(mlp(), ADAM)


@functools.cache
def bn_state():
    model, model_state = bn_net()
    return es.TrainState.create(model, ADAM, model_state=model_state)


def sharded(batch):
    return es.shard(jax.tree_util.tree_map(np.asarray, batch))


BATCH = regression_batch(8)


@functools.cache
def dncnn(depth, num_filters=4):
    return eqx.nn.make_with_state(es.models.DnCNN)(
        depth, 1, num_filters, key=jax.random.key(0)
    )


# --- images of the wrong dtype ----------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_integer_images_are_refused_by_the_steps(dtype):
    batch = {**BATCH, "image": np.asarray(BATCH["image"]).astype(dtype)}
    with pytest.raises(ValueError, match=r"batch\['image'\]` has dtype .*astype"):
        STEP(mlp_state(), sharded(batch))
    with pytest.raises(ValueError, match=r"batch\['image'\]` has dtype"):
        es.train_step(mlp_state(), batch, lr_fn, mse, loss_metrics, axis_name=None)
    with pytest.raises(ValueError, match=r"batch\['image'\]` has dtype"):
        es.eval_step(mlp_state(), batch, mse, loss_metrics, axis_name=None)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_and_boolean_inputs_that_are_not_images_pass_as_they_are(dtype):
    # Token ids (signed, (n, T)) and masks reach the model with their dtype.
    seen = []

    class Probe(eqx.Module):
        linear: eqx.nn.Linear

        def __call__(self, x):
            seen.append(x.dtype)
            return self.linear(x.astype(jnp.float32))

    probe = es.TrainState.create(Probe(mlp().layers[0]), ADAM)
    x = np.asarray(BATCH["image"]).astype(dtype)
    label = np.zeros((8, mlp().layers[0].out_features), np.float32)
    batch = {"image": x, "label": label}
    es.train_step(probe, batch, lr_fn, mse, loss_metrics, axis_name=None)
    es.eval_step(probe, batch, mse, loss_metrics, axis_name=None)
    assert seen and all(d == dtype for d in seen)


def test_create_input_iter_casts_integer_images_keeps_integer_labels():
    # The decision: as SCICO's iterator, the images are cast to `dtype`.
    ds = {
        "image": np.arange(8 * 3, dtype=np.uint8).reshape(8, 3),
        "label": np.arange(8, dtype=np.int32),
    }
    batch = next(es.create_input_iter(0, ds, 8, train=False))
    assert batch["image"].dtype == jnp.float32
    assert batch["label"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(batch["image"]).reshape(8, 3), ds["image"])


def test_float_images_of_another_dtype_than_the_model_are_refused():
    batch = {**BATCH, "image": np.asarray(BATCH["image"], np.float16)}
    with pytest.raises(ValueError, match="float16.*model's floating-point leaves"):
        STEP(mlp_state(), sharded(batch))


def test_float64_images_with_x64_on_are_refused():
    with jax.enable_x64(True):
        batch = {**BATCH, "image": np.asarray(BATCH["image"], np.float64)}
        with pytest.raises(ValueError, match="float64.*are float32.*astype"):
            es.train_step(mlp_state(), batch, lr_fn, mse, loss_metrics, axis_name=None)


@pytest.mark.slow
def test_a_custom_forward_gets_the_images_as_they_are():
    def forward(model, model_state, x, *, key=None, inference=False):
        return es.per_example(model, model_state, x.astype(jnp.float32))

    state = es.TrainState.create(mlp(), ADAM, forward=forward)
    batch = {**BATCH, "image": np.asarray(BATCH["image"], np.float16)}
    new, _ = es.train_step(state, batch, lr_fn, mse, loss_metrics, axis_name=None)
    assert int(new.step) == 1


# --- the model and its state --------------------------------------------------------


def test_a_model_that_is_not_callable_is_refused():
    # A state of a non-callable model can be made (e.g. to checkpoint it); the
    # steps refuse it when they are traced, before compiling.
    state = es.TrainState.create({"w": jnp.ones((4, 2))}, ADAM)
    with pytest.raises(TypeError, match="`state.model` must be callable.*dict"):
        STEP(state, sharded(BATCH))


def test_batchnorm_without_model_state_is_refused():
    model, model_state = bn_net()
    with pytest.raises(ValueError, match="`model_state` is None.*make_with_state"):
        es.TrainState.create(model, ADAM)
    with pytest.raises(ValueError, match="`model_state` is None"):
        bn_state().replace(model_state=None)
    with pytest.raises(ValueError, match="`model_state` is None"):
        es.create_basic_train_state({}, model, 0.1)
    # A state built around the checks still fails in the step, before compiling.
    bare = dataclasses_replace(bn_state(), model_state=None)
    with pytest.raises(ValueError, match=r"`state.model_state` is None"):
        STEP(bare, sharded(BATCH))


def dataclasses_replace(state, **changes):
    import dataclasses

    return dataclasses.replace(state, **changes)


def test_a_model_state_of_another_model_is_detected():
    # The case: a depth-4 DnCNN's state trained a depth-3 model silently.
    model3, _ = dncnn(3)
    _, state4 = dncnn(4)
    with pytest.raises(ValueError, match="does not belong to `model`.*no layer"):
        es.TrainState.create(model3, ADAM, model_state=state4)
    model4, _ = dncnn(4)
    _, state3 = dncnn(3)
    with pytest.raises(ValueError, match="lacks the entries of the layers"):
        es.TrainState.create(model4, ADAM, model_state=state3)
    with pytest.raises(TypeError, match="must be an eqx.nn.State"):
        es.TrainState.create(model3, ADAM, model_state={"bn": 1})
    with pytest.raises(ValueError, match="no layer of `model` uses"):
        es.TrainState.create(mlp(), ADAM, model_state=state3)


@pytest.mark.slow
def test_a_model_state_of_other_sizes_is_detected():
    model, _ = dncnn(3, num_filters=4)
    _, wider = dncnn(3, num_filters=6)  # the same layers, other widths
    with pytest.raises(ValueError, match=r"statistics of shapes \[\(6,\), \(6,\)\]"):
        es.TrainState.create(model, ADAM, model_state=wider)


class Counter(eqx.Module):
    """A stateful layer that is not a BatchNorm: counts its calls."""

    index: eqx.nn.StateIndex
    lin: eqx.nn.Linear

    def __init__(self, size):
        self.index = eqx.nn.StateIndex(jnp.zeros(size))
        self.lin = eqx.nn.Linear(4, 2, key=jax.random.key(0))

    def __call__(self, x, state, *, key=None):
        count = state.get(self.index)
        return self.lin(x), state.set(self.index, count[:3] + 1)


def test_a_model_state_of_other_sizes_is_named_when_a_layer_writes_it():
    model, _ = eqx.nn.make_with_state(Counter)(3)
    _, other = eqx.nn.make_with_state(Counter)(5)
    state = es.TrainState.create(model, ADAM, model_state=other)
    with pytest.raises(
        ValueError, match=r"its entry 'Counter.index' holds float32\[5\]"
    ):
        es.train_step(state, BATCH, lr_fn, mse, loss_metrics, axis_name=None)


def test_replace_with_other_shapes_names_the_leaf():
    state = mlp_state()
    other = eqx.nn.MLP(4, 2, 5, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"leaf model\.layers\[0\]\.weight.*\(5, 4\)"):
        state.replace(model=other)
    half = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float16) if eqx.is_inexact_array(x) else x, mlp()
    )
    with pytest.raises(ValueError, match="dtype float16, where the state has"):
        state.replace(model=half)
    # The same shapes are fine, and static fields may change.
    same = eqx.nn.MLP(4, 2, 8, 2, activation=jax.nn.tanh, key=jax.random.key(1))
    assert state.replace(model=same).model is same


# --- the parallel steps -------------------------------------------------------------


def test_a_replicated_state_is_refused_by_the_parallel_steps():
    replicated = es.replicate(mlp_state())
    with pytest.raises(ValueError, match="leading device axis.*unreplicate"):
        STEP(replicated, sharded(BATCH))


@pytest.mark.slow
def test_a_donated_state_passed_again_is_named():
    step = es.parallel_train_step(lr_fn, mse, loss_metrics, donate=True)
    first = es.TrainState.create(mlp(seed=3), ADAM)
    second, _ = step(first, sharded(BATCH))  # the state passed in is copied
    step(second, sharded(BATCH))  # consumes `second`
    with pytest.raises(ValueError, match="donated to a previous call"):
        step(second, sharded(BATCH))


@pytest.mark.parametrize(
    "schedule, words",
    [
        (lambda step: "0.1", "not a valid JAX type"),
        (lambda step: jnp.full(3, 0.1), r"shape \(3,\)"),
        (lambda step: 0.1 if step < 3 else 0.0, "TracerBoolConversionError"),
    ],
)
def test_a_bad_schedule_is_refused_when_the_step_is_built(schedule, words):
    with pytest.raises(TypeError, match=f"`learning_rate_fn`.*{words}"):
        es.parallel_train_step(schedule, mse, loss_metrics)
    with pytest.raises(TypeError, match="`learning_rate_fn`"):
        es.create_basic_train_state({}, mlp(), schedule)
    with pytest.raises(TypeError, match="`learning_rate_fn`"):
        es.train_step(mlp_state(), BATCH, schedule, mse, loss_metrics, axis_name=None)


def test_a_bad_schedule_from_the_config_is_refused_by_the_trainer():
    ds = {k: np.asarray(v) for k, v in regression_batch(8).items()}
    config = {"batch_size": 8, "lr_schedule": lambda cfg: lambda s: jnp.ones(2)}
    with pytest.raises(TypeError, match=r"lr_schedule.*shape \(2,\)"):
        es.BasicTrainer(config, mlp(), ds, ds)


def test_post_lst_entries_must_be_callable():
    with pytest.raises(TypeError, match=r"`post_lst\[1\]` must be a function"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, post_lst=[lambda m: m, 3])
    with pytest.raises(TypeError, match="`post_lst` must be a list"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, post_lst=len)
    with pytest.raises(TypeError, match=r"`post_lst\[0\]` must be a function"):
        es.train_step_post(
            mlp_state(), BATCH, lr_fn, mse, es.train_step, loss_metrics, ["clip"]
        )


def test_functions_must_be_callable():
    with pytest.raises(TypeError, match="`criterion` must be a function"):
        es.parallel_train_step(lr_fn, "mse", loss_metrics)
    with pytest.raises(TypeError, match="`metrics_fn` must be a function"):
        es.parallel_eval_step(mse, None)


# --- datasets -----------------------------------------------------------------------


def test_an_empty_test_set_is_named_test_ds():
    empty = {"image": np.zeros((0, 4), np.float32), "label": np.zeros((0, 2))}
    config = {"batch_size": 8}
    with pytest.raises(ValueError, match="`test_ds` has no examples"):
        es.only_evaluate(config, mlp(), empty)
    with pytest.raises(ValueError, match="`test_ds` has no examples"):
        es.only_apply(config, mlp(), empty)
    with pytest.raises(ValueError, match="`test_ds` has no examples"):
        es.create_input_iter(None, empty, 8, train=False, name="test_ds")
    ds8 = {"image": np.zeros((8, 4), np.float32), "label": np.zeros((8, 2))}
    with pytest.raises(ValueError, match="`test_ds` has no examples"):
        es.BasicTrainer(config, mlp(), ds8, empty)

"""Any Equinox model, any batch (issue 19): PyTree batches, several inputs, token
ids, step-counted runs, a user's iterable, no test set, and no silent difference
from a plain Equinox loop: each through the public API."""

import functools
import warnings

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import DropNet, loss_metrics, lr_fn, mlp, mse, regression_batch
from hypothesis import given, settings
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_steps as es


SGD = optax.sgd(0.1)


# --- a batch is any PyTree of arrays -----------------------------------------------


class Flat(eqx.Module):
    """A linear model of any PyTree input: its leaves, flattened and joined."""

    linear: eqx.nn.Linear

    def __call__(self, x):
        leaves = jax.tree_util.tree_leaves(x)
        return self.linear(jnp.concatenate([jnp.ravel(a) for a in leaves]))


def _structure(kind: int, x: np.ndarray):
    a, b = x[:, :2], x[:, 2:]
    return [
        x,
        (a, b),
        {"a": a, "b": b},
        {"a": (a,), "b": {"c": b[:, :1], "d": b[:, 1:]}},
    ][kind]


def _plain_step(model, opt_state, x, y):
    # A plain Equinox loop: vmap, half-MSE as the library's default, SGD.
    def loss(m):
        return es.mse_loss(jax.vmap(m)(x), y)

    grads = eqx.filter_grad(loss)(model)
    updates, opt_state = SGD.update(grads, opt_state)
    return eqx.apply_updates(model, updates), opt_state


_PLAIN = eqx.filter_jit(_plain_step)


@functools.cache
def _parallel_step(n_devices: int):
    return es.parallel_train_step(
        lr_fn, es.mse_loss, loss_metrics, devices=jax.devices()[:n_devices]
    )


@settings(max_examples=6)
@given(
    kind=st.integers(0, 3),
    n_devices=st.sampled_from([1, 2, 4]),
    jax_leaves=st.booleans(),
)
def test_any_pytree_batch_round_trips_and_steps_as_the_plain_loop(
    kind, n_devices, jax_leaves
):
    rng = np.random.default_rng(kind)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.normal(size=(8, 2)).astype(np.float32)
    inputs = _structure(kind, x)
    if jax_leaves:
        inputs = jax.tree_util.tree_map(jnp.asarray, inputs)
    batch = {"image": inputs, "label": y}
    devices = jax.devices()[:n_devices]
    sharded = es.shard(batch, devices)
    # The round trip: the same leaves, the same structure.
    assert jax.tree_util.tree_structure(sharded) == jax.tree_util.tree_structure(batch)
    for before, after in zip(
        jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(sharded)
    ):
        assert after.shape[:2] == (n_devices, 8 // n_devices)
        np.testing.assert_array_equal(np.asarray(after).reshape(before.shape), before)

    model = Flat(eqx.nn.Linear(4, 2, key=jax.random.key(0)))
    state = es.TrainState.create(model, SGD)
    new, metrics = _parallel_step(n_devices)(state, sharded)
    plain, _ = _PLAIN(model, SGD.init(eqx.filter(model, eqx.is_array)), inputs, y)
    for a, b in zip(
        jax.tree_util.tree_leaves(new.model), jax.tree_util.tree_leaves(plain)
    ):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
    assert np.isfinite(float(metrics["loss"]))


def test_jax_leaves_on_one_device_are_laid_out_as_the_step_places_a_batch():
    """One compiled call reshapes JAX leaves into the step's own layout (on one
    device too, where a sharding constraint would give `P()`), so the step takes
    them as they are; its result is the NumPy batch's."""
    rng = np.random.default_rng(0)
    host = {
        "image": rng.normal(size=(8, 4)).astype(np.float32),
        "label": rng.normal(size=(8, 2)).astype(np.float32),
    }
    devices = jax.devices()[:1]
    placed = es.shard(jax.tree_util.tree_map(jnp.asarray, host), devices)
    layout = NamedSharding(es.device_mesh(devices), P(es.DEVICE_AXIS))
    for leaf in jax.tree_util.tree_leaves(placed):
        assert isinstance(leaf, jax.Array) and leaf.sharding == layout
        assert leaf.shape[0] == 1
    state = es.TrainState.create(Flat(eqx.nn.Linear(4, 2, key=jax.random.key(0))), SGD)
    step = _parallel_step(1)
    a, _ = step(state, placed)
    b, _ = step(state, es.shard(host, devices))
    assert eqx.tree_equal(a.model, b.model)
    with pytest.raises(ValueError, match=r"batch\['label'\]"):
        es.shard({"image": jnp.zeros((8, 4)), "label": jnp.zeros(())}, devices)


def test_pytree_datasets_through_the_iterators():
    x = np.arange(16 * 3, dtype=np.float64).reshape(16, 3)
    t = np.arange(16, dtype=np.int32)
    ds = {"image": (x, {"t": t}), "label": x[:, :1]}
    data = es.IterateData(ds, 8, train=False)
    first = next(data)
    np.testing.assert_array_equal(first["image"][0], x[:8])
    np.testing.assert_array_equal(first["image"][1]["t"], t[:8])
    batch = next(es.create_input_iter(0, ds, 8))
    assert (
        batch["image"][0].shape == (4, 2, 3) and batch["image"][0].dtype == jnp.float32
    )
    assert batch["image"][1]["t"].dtype == jnp.int32  # never cast
    masks = {"image": x > 3, "label": x, "mask": x > 5}
    placed = next(es.create_input_iter(0, masks, 8))
    assert placed["image"].dtype == jnp.bool_ and placed["mask"].dtype == jnp.bool_
    with pytest.raises(ValueError, match=r"'image'\[1\]\['t'\]: 15"):
        es.IterateData({"image": (x, {"t": t[:15]}), "label": x}, 8)
    with pytest.raises(TypeError, match=r"dataset\['image'\]\[1\]` is a str"):
        es.IterateData({"image": (x, "words"), "label": x}, 8)


def test_non_array_leaves_are_refused_with_their_path():
    with pytest.raises(TypeError, match=r"batch\['image'\]\[1\]` is a str"):
        es.shard({"image": (np.zeros((8, 2)), "a"), "label": np.zeros((8, 1))})
    step = _parallel_step(4)
    state = es.TrainState.create(mlp(), SGD)
    with pytest.raises(TypeError, match=r"batch\['mask'\]` is a str"):
        step(state, {**es.shard(regression_batch(8)), "mask": "no"})


def test_iterate_data_key_is_scicos_default():
    data = es.IterateData({"image": np.zeros((8, 1))}, 4)
    np.testing.assert_array_equal(data.key, jax.random.PRNGKey(0))
    given_key = es.IterateData({"image": np.zeros((8, 1))}, 4, key=jax.random.key(0))
    np.testing.assert_array_equal(data.permutation(3), given_key.permutation(3))
    ordered = es.IterateData({"image": np.zeros((8, 1))}, 4, shuffle=False)
    np.testing.assert_array_equal(ordered.permutation(5), np.arange(8))


# --- several inputs, token ids --------------------------------------------------


class TwoInputs(eqx.Module):
    linear: eqx.nn.Linear
    embed: eqx.nn.Embedding

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(4, 2, key=k1)
        self.embed = eqx.nn.Embedding(3, 2, key=k2)

    def __call__(self, x, t):
        return self.linear(x) + self.embed(t)


def _two_input_batch(n=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    t = rng.integers(0, 3, size=(n,)).astype(np.int32)
    return x, t, rng.normal(size=(n, 2)).astype(np.float32)


@pytest.mark.parametrize("forward", [es.per_example_args, es.per_example_kwargs])
def test_several_inputs_step_as_the_plain_loop(forward):
    x, t, y = _two_input_batch()
    inputs = (x, t) if forward is es.per_example_args else {"x": x, "t": t}
    model = TwoInputs(jax.random.key(0))
    state = es.TrainState.create(model, SGD, forward=forward)
    new, _ = es.train_step(
        state, {"image": inputs, "label": y}, None, es.mse_loss, loss_metrics,
        axis_name=None,
    )  # fmt: skip

    def loss(m):
        return es.mse_loss(jax.vmap(m)(x, t), y)

    grads = eqx.filter_grad(loss)(model)
    updates, _ = SGD.update(grads, SGD.init(eqx.filter(model, eqx.is_array)))
    plain = eqx.apply_updates(model, updates)
    assert eqx.tree_equal(new.model, plain, rtol=1e-6, atol=1e-7)


def test_a_forward_that_does_not_fit_the_inputs_says_so():
    x, t, y = _two_input_batch()
    state = es.TrainState.create(TwoInputs(jax.random.key(0)), SGD)
    with pytest.raises(ValueError, match="per_example_args"):
        es.train_step(
            state, {"image": (x, t), "label": y}, None, es.mse_loss, loss_metrics,
            axis_name=None,
        )  # fmt: skip
    args = es.TrainState.create(
        TwoInputs(jax.random.key(0)), SGD, forward=es.per_example_args
    )
    with pytest.raises(TypeError, match="must be a tuple"):
        es.train_step(
            args, {"image": x, "label": y}, None, es.mse_loss, loss_metrics,
            axis_name=None,
        )  # fmt: skip


class Tokens(eqx.Module):
    embed: eqx.nn.Embedding
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.embed = eqx.nn.Embedding(5, 3, key=k1)
        self.out = eqx.nn.Linear(3, 5, key=k2)

    def __call__(self, ids):
        return jax.vmap(self.out)(jax.vmap(self.embed)(ids))  # (T, vocab)


def test_token_ids_reach_the_model_uncast_through_the_trainer():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 5, size=(32, 6)).astype(np.int32)
    ds = {"image": ids, "label": np.roll(ids, -1, axis=1)}
    trainer = es.BasicTrainer(
        {"batch_size": 8, "num_steps": 6, "criterion": es.cross_entropy_loss,
         "metrics_fn": es.classification_metrics, "log_every_steps": 3},
        Tokens(jax.random.key(0)), ds, ds,
    )  # fmt: skip
    assert trainer.num_steps == 6 and trainer.ishape == (6,)
    assert next(trainer.eval_dt_iter)["image"].dtype == jnp.int32
    state, history = trainer.train()
    assert int(state.step) == 6 and len(history.records) == 2
    assert history.records[-1]["eval_loss"] < history.records[0]["eval_loss"] + 1


# --- the trainer: steps, shuffle, iterables, no test set, key names ----------------


_X = np.random.default_rng(2).normal(size=(32, 4)).astype(np.float32)
_DS = {"image": _X, "label": _X[:, :2] * 2}


def test_num_steps_shuffle_key_names_and_no_test_set():
    config = {"batch_size": 8, "num_steps": 5, "shuffle": False, "log_every_steps": 5,
              "input_key": "x", "target_key": "y", "opt_type": "SGD"}  # fmt: skip
    ds = {"x": _X, "y": _DS["label"]}
    trainer = es.BasicTrainer(config, mlp(), ds)
    assert trainer.num_steps == 5 and trainer.steps_per_epoch == 4
    state, history = trainer.train()
    assert int(state.step) == 5
    assert (
        "eval_loss" not in history.records[-1] and "train_loss" in history.records[-1]
    )
    # In order: the same as a plain loop over the batches 0, 1, 2, 3, 0.
    model, opt = mlp(), optax.sgd(0.01)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    for i in [0, 1, 2, 3, 0]:
        x, y = _X[8 * i : 8 * i + 8], _DS["label"][8 * i : 8 * i + 8]
        grads = eqx.filter_grad(lambda m: es.mse_loss(jax.vmap(m)(x), y))(model)
        updates, opt_state = opt.update(grads, opt_state)
        model = eqx.apply_updates(model, updates)
    assert eqx.tree_equal(state.model, model, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lacks"):
        es.BasicTrainer(config, mlp(), _DS)


def test_an_iterable_of_batches():
    batches = [
        {"image": _X[i : i + 8], "label": _DS["label"][i : i + 8]} for i in (0, 8)
    ]
    config = {"num_steps": 4, "log_every_steps": 2, "opt_type": "SGD"}
    from_list, _ = es.BasicTrainer(config, mlp(), batches).train()
    # A list is read again: batches 0, 1, 0, 1, as a dict in order with shuffle off.
    from_dict, _ = es.BasicTrainer(
        {**config, "batch_size": 8, "shuffle": False},
        mlp(),
        {k: v[:16] for k, v in _DS.items()},
    ).train()
    assert eqx.tree_equal(from_list.model, from_dict.model, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="num_steps"):
        es.BasicTrainer({"log_every_steps": 2}, mlp(), iter(batches))
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        es.BasicTrainer(config, mlp(), iter(batches)).train()


def test_unused_entries_and_unscaled_images_are_named():
    with pytest.warns(UserWarning, match=r"\['mask'\].*stock steps do not read"):
        es.BasicTrainer({"batch_size": 8}, mlp(), _DS, {**_DS, "mask": _X > 0})
    images = np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1)).astype(np.uint8)
    conv = eqx.nn.Conv2d(1, 1, 3, padding=1, key=jax.random.key(0))

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d

        def __call__(self, x):
            return jnp.moveaxis(self.conv(jnp.moveaxis(x, -1, 0)), 0, -1)

    with pytest.warns(
        UserWarning, match=r"range over \[0, 255\].*clearly not \[0, 1\]"
    ):
        trainer = es.BasicTrainer(
            {"batch_size": 8}, Net(conv), {"image": images, "label": images}
        )
    assert next(trainer.train_dt_iter)["image"].dtype == jnp.float32  # SCICO's cast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        es.BasicTrainer(
            {"batch_size": 8},
            Net(conv),
            {"image": images / 255.0, "label": images / 255.0},
        )


def test_a_plain_function_is_refused_as_the_model():
    with pytest.raises(TypeError, match="no trainable array.*not a plain function"):
        es.BasicTrainer({"batch_size": 8}, lambda x: 2 * x, _DS, _DS)
    state = es.TrainState.create(lambda x: 2 * x, SGD)
    with pytest.raises(ValueError, match="no trainable array"):
        es.train_step(
            state, regression_batch(8), None, mse, loss_metrics, axis_name=None
        )


# --- no silent differences ----------------------------------------------------------


def test_mse_loss_is_half_of_mean_squared_error():
    a, b = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
    assert float(es.mean_squared_error(a, b)) == pytest.approx(np.mean((a - b) ** 2))
    assert float(es.mse_loss(a, b)) == pytest.approx(0.5 * np.mean((a - b) ** 2))
    assert "half" in es.mse_loss.__doc__ and "half" in es.TrainConfig.__doc__


class BN(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, axis_name):
        self.linear = eqx.nn.Linear(4, 2, key=jax.random.key(0))
        self.norm = eqx.nn.BatchNorm(2, axis_name=axis_name, mode="batch")

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


@pytest.mark.parametrize("axis_name, n_devices, warns", [
    ("batch", 2, True), ("batch", 1, False), (("device", "batch"), 2, False),
])  # fmt: skip
def test_per_device_batch_norm_warns_on_several_devices(axis_name, n_devices, warns):
    model, model_state = eqx.nn.make_with_state(BN)(axis_name)
    state = es.TrainState.create(model, SGD, model_state=model_state)
    step = es.parallel_train_step(
        lr_fn, mse, loss_metrics, devices=jax.devices()[:n_devices]
    )
    batch = es.shard(regression_batch(8), jax.devices()[:n_devices])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(state, batch)
    said = [
        str(w.message)
        for w in caught
        if 'axis_name=("device", "batch")' in str(w.message)
    ]
    assert bool(said) == warns


def test_the_recorded_learning_rate_is_the_optimizers():
    config = {"batch_size": 8, "num_steps": 2, "log_every_steps": 2}
    _, history = es.BasicTrainer(config, mlp(), _DS, tx=optax.adam(3e-4)).train()
    assert "train_learning_rate" not in history.records[-1]
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=3e-4)
    _, history = es.BasicTrainer(config, mlp(), _DS, tx=injected).train()
    assert history.records[-1]["train_learning_rate"] == pytest.approx(3e-4)


def test_evaluation_puts_the_model_itself_in_inference_mode():
    # A forward that closes over nothing and ignores `inference`: evaluation still
    # runs Dropout off, so the metrics do not depend on any key.
    def forward(model, model_state, x, *, key=None, inference=False):
        return jax.vmap(lambda xi: model(xi, key=key))(x), model_state

    model = DropNet(key=jax.random.key(0))
    state = es.TrainState.create(model, SGD, forward=forward, key=jax.random.key(1))
    batch = regression_batch(8)
    metrics = es.eval_step(state, batch, mse, loss_metrics, axis_name=None)
    plain = eqx.nn.inference_mode(model)
    expected = mse(jax.vmap(plain)(batch["image"]), batch["label"])
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)


# --- errors that name the real fix -------------------------------------------------


class NeedsKey(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x, *, key):
        return self.linear(x)


class NoKey(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        return self.linear(x)


def test_key_conventions_are_named_from_the_call_signature():
    batch = regression_batch(8)
    lin = eqx.nn.Linear(4, 2, key=jax.random.key(0))
    needs = es.TrainState.create(NeedsKey(lin), SGD, key=jax.random.key(0))
    with pytest.raises(TypeError, match="must accept `key=None`"):
        es.train_step(needs, batch, None, mse, loss_metrics, axis_name=None)
    no_key = es.TrainState.create(NoKey(lin), SGD, key=jax.random.key(0))
    with pytest.raises(TypeError, match="do not pass `key`"):
        es.train_step(no_key, batch, None, mse, loss_metrics, axis_name=None)
    dropped = es.TrainState.create(DropNet(key=jax.random.key(0)), SGD)
    with pytest.raises(RuntimeError, match=r"TrainState.create\(model, tx, key="):
        es.train_step(dropped, batch, None, mse, loss_metrics, axis_name=None)


def test_a_criterion_with_reversed_arguments_is_named():
    def reversed_ce(labels, logits):
        return es.cross_entropy_loss(logits, labels)

    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    batch = {"image": x, "label": np.arange(8, dtype=np.int32) % 2}
    state = es.TrainState.create(mlp(), SGD)
    with pytest.raises(ValueError, match="arguments look reversed"):
        es.train_step(state, batch, None, reversed_ce, loss_metrics, axis_name=None)


def test_scicos_old_create_basic_train_state_call_is_named():
    key = jax.random.PRNGKey(0)
    with pytest.raises(TypeError, match=r"takes \(config, model, lr_fn\).*migration"):
        es.create_basic_train_state(key, {}, mlp(), (4,), lr_fn)


def test_several_inputs_through_the_trainer_and_apply():
    x, t, y = _two_input_batch(20)  # 20: full batches of 8 and a remainder of 4
    ds = {"image": (x, t), "label": y}
    model = TwoInputs(jax.random.key(0))
    config = {"batch_size": 8, "num_steps": 2, "log_every_steps": 2}
    trainer = es.BasicTrainer(config, model, ds, ds, forward=es.per_example_args)
    assert trainer.ishape == ((4,), ())
    state, history = trainer.train()
    assert np.isfinite(history.records[-1]["eval_loss"])
    outputs, _ = es.only_apply(config, state.model, ds, forward=es.per_example_args)
    expected = jax.vmap(state.model)(x, t)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    metrics = es.only_evaluate(config, state.model, ds, forward=es.per_example_args)
    assert metrics["loss"] == pytest.approx(history.records[-1]["eval_loss"], rel=1e-5)

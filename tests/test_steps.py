import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    ADAM,
    bn_net,
    DropNet,
    has_primitive,
    loss_metrics,
    lr_fn,
    max_rel_diff,
    mlp,
    mse,
    regression_batch,
    SGD,
    tree_equal,
)
from hypothesis import given, strategies as st

import eqx_steps as es


@eqx.filter_jit
def single_step(state, batch):
    return es.train_step(state, batch, lr_fn, mse, loss_metrics, axis_name=None)


@eqx.filter_jit
def reference_step(model, opt_state, batch):
    def loss(model):
        out = jax.vmap(model)(batch["image"])
        return mse(out, batch["label"])

    value, grads = eqx.filter_value_and_grad(loss)(model)
    updates, opt_state = ADAM.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, value


@given(seed=st.integers(0, 5), n=st.sampled_from([8, 16]))
def test_train_step_equals_hand_written_update(seed, n):
    model = mlp(seed)
    state = es.TrainState.create(model, ADAM)
    batch = regression_batch(n, seed)
    opt_state = ADAM.init(eqx.filter(model, eqx.is_array))
    for step in range(3):
        state, metrics = single_step(state, batch)
        model, opt_state, loss = reference_step(model, opt_state, batch)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        np.testing.assert_allclose(metrics["learning_rate"], lr_fn(step), rtol=1e-6)
    assert max_rel_diff(state.model, model) < 1e-6
    assert int(state.step) == 3


def test_learning_rate_from_injected_hyperparams():
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr_fn)
    state = es.TrainState.create(mlp(), tx)
    batch = regression_batch(8)
    step = eqx.filter_jit(
        lambda s, b: es.train_step(s, b, None, mse, loss_metrics, axis_name=None)
    )
    for i in range(3):
        state, metrics = step(state, batch)
        np.testing.assert_allclose(metrics["learning_rate"], lr_fn(i), rtol=1e-6)


def test_no_learning_rate_anywhere_records_none():
    # An optimizer that holds no learning rate and no schedule: the metric is
    # left out rather than made up.
    state = es.TrainState.create(mlp(), ADAM)
    _, metrics = es.train_step(
        state, regression_batch(8), None, mse, loss_metrics, axis_name=None
    )
    assert "learning_rate" not in metrics and "loss" in metrics


def test_keys_differ_per_step_and_are_deterministic():
    model = DropNet(key=jax.random.key(0))
    batch = regression_batch(8)

    def run():
        state = es.TrainState.create(model, optax.sgd(0.0), key=jax.random.key(1))
        losses = []
        for _ in range(3):
            state, metrics = single_step(state, batch)
            losses.append(float(metrics["loss"]))
        return losses

    first, second = run(), run()
    assert first == second
    assert len(set(first)) == 3  # lr 0: only the dropout masks change the loss


def test_batchnorm_state_updates_in_training_and_not_in_eval():
    model, model_state = bn_net()
    state = es.TrainState.create(model, ADAM, model_state=model_state)
    batch = regression_batch(16)
    new, _ = single_step(state, batch)
    assert not tree_equal(new.model_state, state.model_state)
    metrics = es.eval_step(state, batch, mse, es.compute_metrics, axis_name=None)
    assert set(metrics) == {"loss", "snr"}
    # Inference mode uses the running statistics: the output equals a hand-made
    # inference-mode call and does not depend on the other examples of the batch.
    out, _ = es.per_example(model, model_state, batch["image"], inference=True)
    out1, _ = es.per_example(model, model_state, batch["image"][:1], inference=True)
    np.testing.assert_allclose(out[:1], out1, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], mse(out, batch["label"]), rtol=1e-6)


def test_eval_is_metrics_fn_on_the_whole_batch():
    # SCICO's eval_step: one SNR over the whole per-device batch, not a mean of
    # per-example SNRs (evaluate_dataset combines batches).
    state = es.TrainState.create(mlp(), ADAM)
    batch = regression_batch(8)
    metrics = es.eval_step(state, batch, mse, es.compute_metrics, axis_name=None)
    out = jax.vmap(state.model)(batch["image"])
    want = es.compute_metrics(out, batch["label"], mse)
    assert set(metrics) == {"loss", "snr"}
    for k in ("loss", "snr"):
        np.testing.assert_allclose(metrics[k], want[k], rtol=1e-5)
    per_example = np.mean([float(es.snr(batch["label"][i], out[i])) for i in range(8)])
    assert abs(float(metrics["snr"]) - per_example) > 1e-3


def test_whole_batch_forward_equals_per_example():
    model = mlp()
    x = regression_batch(8)["image"]
    y1, _ = es.per_example(model, None, x)
    y2, _ = es.whole_batch(jax.vmap(model), None, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-6)


def test_train_step_post_applies_post_processors_to_trainable_leaves():
    state = es.TrainState.create(mlp(), ADAM)
    batch = regression_batch(8)
    clip = functools.partial(
        es.clip_range,
        traversal=es.construct_traversal("weight"),
        minval=-0.05,
        maxval=0.05,
    )
    post, _ = es.train_step_post(
        state, batch, lr_fn, mse, es.train_step, loss_metrics, [clip], axis_name=None
    )
    plain, _ = es.train_step(state, batch, lr_fn, mse, loss_metrics, axis_name=None)
    for layer_post, layer_plain in zip(post.model.layers, plain.model.layers):
        assert float(jnp.max(jnp.abs(layer_post.weight))) <= 0.05 + 1e-7
        np.testing.assert_array_equal(layer_post.bias, layer_plain.bias)


def test_post_processor_that_changes_structure_is_refused():
    state = es.TrainState.create(mlp(), ADAM)

    def bad(model):
        return eqx.tree_at(lambda m: m.layers[0].weight, model, jnp.zeros((3,)))

    with pytest.raises(ValueError, match=r"post_lst\[0\]"):
        es.train_step_post(
            state,
            regression_batch(8),
            lr_fn,
            mse,
            es.train_step,
            loss_metrics,
            [bad],
            axis_name=None,
        )


@pytest.mark.parametrize(
    "batch, error, match",
    [
        ([1, 2], TypeError, "dict with keys 'image' and 'label'"),
        ({"x": jnp.ones((4, 4)), "label": jnp.ones((4, 2))}, ValueError, "'image'"),
        ({"image": jnp.ones((4, 4))}, ValueError, "'label'"),
    ],
)
def test_bad_batches_are_refused(batch, error, match):
    state = es.TrainState.create(mlp(), ADAM)
    with pytest.raises(error, match=match):
        es.train_step(state, batch, lr_fn, mse, loss_metrics, axis_name=None)
    with pytest.raises(error, match=match):
        es.eval_step(state, batch, mse, loss_metrics, axis_name=None)


def test_steps_under_a_users_own_filter_pmap():
    """SCICO's tests drive the per-device steps with their own pmap."""
    model, model_state = bn_net(("device", "batch"))
    state = es.TrainState.create(model, SGD, model_state=model_state)
    batch = regression_batch(16)
    step = eqx.filter_pmap(
        functools.partial(
            es.train_step,
            learning_rate_fn=lr_fn,
            criterion=mse,
            metrics_fn=loss_metrics,
        ),
        axis_name="device",
    )
    new_rep, metrics = step(es.replicate(state), es.shard(batch))
    new_rep = es.sync_model_state(new_rep)
    ref, ref_metrics = single_step(
        es.TrainState.create(bn_net("batch")[0], SGD, model_state=model_state), batch
    )
    new = es.unreplicate(new_rep)
    np.testing.assert_allclose(metrics["loss"][0], ref_metrics["loss"], rtol=1e-5)
    assert max_rel_diff(new.model, ref.model) < 1e-5
    assert max_rel_diff(new.model_state, ref.model_state) < 1e-5


@pytest.mark.parametrize("n_devices", [1, 2])
def test_collectives_are_skipped_over_a_one_device_axis(n_devices):
    # A mean over one device is the identity; XLA would keep the all-reduce (and
    # a second copy of every gradient alive across it), so the steps leave it out.
    from jax.sharding import Mesh, PartitionSpec as P

    state = es.TrainState.create(mlp(), ADAM)
    dynamic, static = eqx.partition(state, eqx.is_array)
    batch = regression_batch(8)
    mesh = Mesh(np.asarray(jax.devices()[:n_devices]), ("device",))

    def both(dynamic, batch):
        state = eqx.combine(dynamic, static)
        new, metrics = es.train_step(state, batch, lr_fn, mse, loss_metrics)
        evaluated = es.eval_step(state, batch, mse, loss_metrics)
        return eqx.filter(new, eqx.is_array), metrics, evaluated

    mapped = jax.jit(
        jax.shard_map(
            both, mesh=mesh, in_specs=(P(), P("device")), out_specs=P(), check_vma=False
        )
    )
    jaxpr = jax.make_jaxpr(mapped)(dynamic, batch)
    assert has_primitive(jaxpr.jaxpr, "psum") == (n_devices > 1)
    new, metrics, _ = mapped(dynamic, batch)
    ref, ref_metrics = single_step(state, batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    assert max_rel_diff(eqx.combine(new, static).model, ref.model) < 1e-5

import dataclasses
import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    ADAM,
    bn_net,
    leaves_equal,
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


BACKENDS = ["pmap", "sharded"]


@eqx.filter_jit
def single_step(state, batch):
    return es.train_step(state, batch, lr_fn, mse, loss_metrics, axis_name=None)


# One compiled parallel step per configuration, shared by all tests (compiles are
# cached by the state's structure inside each callable).
@functools.cache
def parallel(backend, donate=True, steps_per_call=1, nan_policy="raise"):
    return es.parallel_train_step(
        lr_fn,
        mse,
        loss_metrics,
        backend=backend,
        donate=donate,
        steps_per_call=steps_per_call,
        nan_policy=nan_policy,
    )


def run_single(state, batches):
    for b in batches:
        state, metrics = single_step(state, b)
    return state, metrics


def run_parallel(fn, state, batches):
    for b in batches:
        state, metrics = fn(state, es.shard(b))
    return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=st.integers(0, 3))
def test_four_devices_equal_one_device_on_the_global_batch(backend, seed):
    batches = [regression_batch(16, seed + i) for i in range(5)]
    ref, ref_metrics = run_single(es.TrainState.create(mlp(seed), ADAM), batches)
    new, metrics = run_parallel(
        parallel(backend), es.TrainState.create(mlp(seed), ADAM), batches
    )
    assert int(new.step) == 5
    assert max_rel_diff(new.model, ref.model) < 1e-5
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["learning_rate"], lr_fn(4), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_device_batchnorm_equals_one_device(backend):
    batches = [regression_batch(16, i) for i in range(3)]
    model, ms = bn_net(("device", "batch"))
    new, _ = run_parallel(
        parallel(backend), es.TrainState.create(model, SGD, model_state=ms), batches
    )
    model1, ms1 = bn_net("batch")
    ref, _ = run_single(es.TrainState.create(model1, SGD, model_state=ms1), batches)
    assert max_rel_diff(new.model, ref.model) < 1e-5
    assert max_rel_diff(new.model_state, ref.model_state) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_device_batchnorm_state_is_the_cross_device_mean(backend):
    model, ms = bn_net("batch")
    state = es.TrainState.create(model, SGD, model_state=ms)
    batch = regression_batch(16)
    new, _ = parallel(backend)(
        es.TrainState.create(model, SGD, model_state=ms), es.shard(batch)
    )
    # Each device's statistics come from its own quarter of the batch.
    per_device = [
        single_step(state, {k: v[4 * d : 4 * d + 4] for k, v in batch.items()})[0]
        for d in range(4)
    ]
    expected = jax.tree_util.tree_map(
        lambda *xs: np.mean(xs, axis=0) if eqx.is_inexact_array(xs[0]) else xs[0],
        *[s.model_state for s in per_device],
    )
    assert max_rel_diff(new.model_state, expected) < 1e-5
    # Per-device statistics differ from global ones: the check above has teeth.
    global_ref = single_step(state, batch)[0]
    assert max_rel_diff(new.model_state, global_ref.model_state) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_per_call_equals_single_calls(backend):
    batches = [regression_batch(16, i) for i in range(6)]
    ref, ref_metrics = run_parallel(
        parallel(backend), es.TrainState.create(mlp(), ADAM), batches
    )
    multi = parallel(backend, steps_per_call=3)
    state = es.TrainState.create(mlp(), ADAM)
    losses = []
    for i in (0, 3):
        stacked = jax.tree_util.tree_map(
            lambda *xs: jnp.stack(xs), *[es.shard(b) for b in batches[i : i + 3]]
        )
        state, metrics = multi(state, stacked)
        assert metrics["loss"].shape == (3,)
        losses.extend(np.asarray(metrics["loss"]))
    assert int(state.step) == 6
    assert max_rel_diff(state.model, ref.model) < 1e-6
    np.testing.assert_allclose(losses[-1], ref_metrics["loss"], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_donation_keeps_the_batch_and_the_results(backend):
    batches = [regression_batch(16, i) for i in range(3)]
    model = mlp()
    sharded = [es.shard(b) for b in batches]
    copies = [jax.tree_util.tree_map(np.array, b) for b in sharded]
    donated, _ = run_parallel(
        parallel(backend, donate=True), es.TrainState.create(model, ADAM), batches
    )
    state = es.TrainState.create(model, ADAM)
    for b in sharded:
        state, _ = parallel(backend, donate=True)(state, b)
    kept, _ = run_parallel(
        parallel(backend, donate=False), es.TrainState.create(model, ADAM), batches
    )
    assert tree_equal(donated, kept) and tree_equal(state, kept)
    for b, c in zip(sharded, copies):  # the caller's batch is intact
        for k in b:
            np.testing.assert_array_equal(np.asarray(b[k]), c[k])
    # The model the state was built from is never donated.
    np.testing.assert_array_equal(
        np.asarray(model.layers[0].weight), np.asarray(mlp().layers[0].weight)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_step_equals_one_device(backend):
    model, ms = bn_net("batch")
    state = es.TrainState.create(model, SGD, model_state=ms)
    state, _ = single_step(state, regression_batch(16, 7))
    batch = regression_batch(16)
    metrics = es.parallel_eval_step(mse, es.compute_metrics, backend=backend)(
        state, es.shard(batch)
    )
    ref = es.eval_step(state, batch, mse, es.compute_metrics, axis_name=None)
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-5)
    # SNR is averaged over device batches (as SCICO does), not over the global batch.
    assert np.isfinite(float(metrics["snr"]))


def nan_batch():
    batch = regression_batch(16)
    return {"image": batch["image"].at[3, 0].set(jnp.nan), "label": batch["label"]}


# donate=False: the state to continue from is the one passed in, kept on the
# host (the program selects nothing); donate=True: selected on the devices.
@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy_raise_names_the_step_and_keeps_the_state(backend, donate):
    fn = parallel(backend, donate=donate)
    state, _ = fn(es.TrainState.create(mlp(), ADAM), es.shard(regression_batch(16)))
    kept = jax.tree_util.tree_map(np.asarray, eqx.filter(state, eqx.is_array))
    with pytest.raises(FloatingPointError, match="step 1") as info:
        fn(state, es.shard(nan_batch()))
    assert isinstance(info.value, es.NonFiniteStepError)
    after = info.value.state  # pyright: ignore
    assert isinstance(after, es.TrainState)
    assert int(after.step) == 2
    assert leaves_equal(after.model, kept.model)
    assert leaves_equal(after.opt_state, kept.opt_state)
    # Training goes on from the state the error carries.
    newer, _ = fn(after, es.shard(regression_batch(16)))
    assert int(newer.step) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_policy_skip_drops_the_update_and_counts_the_step(backend):
    fn = parallel(backend, donate=False, nan_policy="skip")
    state = es.TrainState.create(mlp(), ADAM)
    new, metrics = fn(state, es.shard(nan_batch()))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(new.step) == 1
    assert tree_equal(new.model, state.model) and tree_equal(
        new.opt_state, state.opt_state
    )
    newer, metrics = fn(new, es.shard(regression_batch(16)))
    assert float(metrics["nonfinite"]) == 0.0 and not tree_equal(newer.model, new.model)


def test_nan_policy_ignore_applies_the_update():
    fn = parallel("pmap", donate=False, nan_policy="ignore")
    new, metrics = fn(es.TrainState.create(mlp(), ADAM), es.shard(nan_batch()))
    assert "nonfinite" not in metrics
    assert not np.isfinite(np.asarray(new.model.layers[0].weight)).all()


def test_post_lst_runs_inside_the_parallel_step():
    clip = functools.partial(
        es.clip_range,
        traversal=es.construct_traversal("weight"),
        minval=-0.01,
        maxval=0.01,
    )
    fn = es.parallel_train_step(lr_fn, mse, loss_metrics, post_lst=[clip])
    state, _ = fn(es.TrainState.create(mlp(), ADAM), es.shard(regression_batch(16)))
    for layer in state.model.layers:
        assert float(jnp.max(jnp.abs(layer.weight))) <= 0.01 + 1e-7


def test_frozen_leaves_never_change_in_parallel():
    model = mlp()
    spec = jax.tree_util.tree_map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: m.layers[1].weight, spec, replace=False)
    state = es.TrainState.create(model, ADAM, trainable=spec)
    fn = es.parallel_train_step(lr_fn, mse, loss_metrics, backend="sharded")
    for i in range(3):
        state, _ = fn(state, es.shard(regression_batch(16, i)))
    np.testing.assert_array_equal(state.model.layers[1].weight, model.layers[1].weight)
    assert not np.allclose(state.model.layers[0].weight, model.layers[0].weight)


# --- bad input ------------------------------------------------------------------


def test_shard_refuses_a_batch_not_divisible_by_the_devices():
    with pytest.raises(ValueError, match=r"not divisible by the 4 local devices"):
        es.shard(regression_batch(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_step_refuses_bad_batches(backend):
    fn = parallel(backend, donate=False)
    state = es.TrainState.create(mlp(), ADAM)
    with pytest.raises(ValueError, match=r"expected leading axes \(4,\).*shard"):
        fn(state, regression_batch(16))
    with pytest.raises(ValueError, match="'label'"):
        fn(state, {"image": es.shard(regression_batch(16))["image"]})
    with pytest.raises(ValueError, match=r"steps_per_call=3"):
        parallel(backend, steps_per_call=3)(state, es.shard(regression_batch(16)))
    with pytest.raises(TypeError, match="TrainState"):
        fn(state.model, es.shard(regression_batch(16)))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="backend"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, backend="mpi")  # pyright: ignore
    with pytest.raises(ValueError, match="nan_policy"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, nan_policy="warn")  # pyright: ignore
    with pytest.raises(ValueError, match="steps_per_call"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, steps_per_call=0)
    with pytest.raises(ValueError, match="unroll"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, unroll=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiler_options_reach_xla(backend):
    # XLA:CPU combines the gradients' all-reduces into one; with the combiner off
    # for this step only, each gradient leaf keeps its own (the low-memory setting
    # of docs/performance.md), and the result is the same.
    batch = es.shard(regression_batch(16))
    counts, losses = [], []
    for options in (None, {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}):
        step = es.parallel_train_step(
            lr_fn, mse, loss_metrics, backend=backend, compiler_options=options
        )
        _, metrics = step(es.TrainState.create(mlp(), ADAM), batch)
        losses.append(float(metrics["loss"]))
        lowered = step.lower(es.TrainState.create(mlp(), ADAM), batch)  # pyright: ignore
        hlo = lowered.compile().as_text()
        counts.append(hlo.count(" all-reduce("))
    assert counts[0] == 1 and counts[1] > 1
    assert losses[0] == losses[1]
    with pytest.raises(ValueError, match="compiler_options"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, compiler_options={"a": 1})
    with pytest.raises(TypeError, match="compiler_options"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, compiler_options="fast")  # pyright: ignore


class ConvNet(eqx.Module):
    """A 1-d convolution called through a nested `jit`, on a feature vector."""

    conv: eqx.nn.Conv1d

    def __init__(self):
        self.conv = eqx.nn.Conv1d(1, 2, 3, padding=1, key=jax.random.key(0))

    def __call__(self, x, *, key=None):
        return jnp.mean(eqx.filter_jit(_apply)(self.conv, x[None]), axis=1)


def _apply(layer, x):
    return layer(x)


@pytest.mark.parametrize("model", [ConvNet, mlp], ids=["conv", "dense"])
def test_auto_unroll_unrolls_steps_with_convolutions_only(model):
    # unroll="auto" unrolls the scan over steps_per_call steps only for steps with
    # a convolution, found through the jit/scan/vmap/grad that wrap it.
    fn = parallel("sharded", steps_per_call=2)
    batch = jax.tree_util.tree_map(
        lambda x: jnp.stack([x, x]), es.shard(regression_batch(16))
    )
    text = fn.lower(es.TrainState.create(model(), ADAM), batch).as_text()  # pyright: ignore
    assert ("stablehlo.convolution" in text) == (model is ConvNet)
    assert ("stablehlo.while" in text) == (model is not ConvNet)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_does_not_donate_so_earlier_states_stay_usable(backend):
    fn = es.parallel_train_step(lr_fn, mse, loss_metrics, backend=backend)
    batch = es.shard(regression_batch(16))
    first, _ = fn(es.TrainState.create(mlp(), ADAM), batch)
    second, _ = fn(first, batch)
    again, _ = fn(first, batch)  # the earlier state, kept as a "best model" would be
    assert int(first.step) == 1 and tree_equal(again, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reusing_a_donated_state_names_donation_and_the_fix(backend):
    fn = parallel(backend, donate=True)
    batch = es.shard(regression_batch(16))
    initial = es.TrainState.create(mlp(), ADAM)
    first, _ = fn(initial, batch)
    fn(first, batch)  # consumes `first`
    with pytest.raises(ValueError, match=r"donated.*donate=False"):
        fn(first, batch)
    fn(initial, batch)  # the state built by the user is never donated


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_replicated_state_is_refused_with_the_fix(backend):
    state = es.TrainState.create(mlp(), ADAM)
    batch = es.shard(regression_batch(16))
    with pytest.raises(ValueError, match=r"shape \(4,\).*unreplicate"):
        parallel(backend, donate=False)(es.replicate(state), batch)
    evaluate = es.parallel_eval_step(mse, loss_metrics, backend=backend)
    with pytest.raises(ValueError, match="unreplicate"):
        evaluate(es.replicate(state), batch)


@functools.cache
def on_devices(backend, n_devices):
    devices = jax.local_devices()[:n_devices]
    return es.parallel_train_step(
        lr_fn, mse, loss_metrics, backend=backend, devices=devices
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@given(n_devices=st.sampled_from([1, 2, 4]), seed=st.integers(0, 3))
def test_any_subset_of_devices_equals_one_device(backend, n_devices, seed):
    devices = jax.local_devices()[:n_devices]
    fn = on_devices(backend, n_devices)
    batches = [regression_batch(8, seed + i) for i in range(3)]
    ref, ref_metrics = run_single(es.TrainState.create(mlp(seed), ADAM), batches)
    state = es.TrainState.create(mlp(seed), ADAM)
    for b in batches:
        state, metrics = fn(state, es.shard(b, devices))
    assert max_rel_diff(state.model, ref.model) < 1e-5
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    assert state.model.layers[0].weight.devices() == set(devices)
    if n_devices < 4:
        with pytest.raises(ValueError, match=rf"leading axes \({n_devices},\)"):
            fn(state, es.shard(batches[0]))


def test_bad_devices_are_refused():
    with pytest.raises(TypeError, match="devices"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, devices=[0, 1])  # pyright: ignore
    with pytest.raises(TypeError, match="devices"):
        es.parallel_eval_step(mse, loss_metrics, devices=[])
    d = jax.local_devices()[0]
    with pytest.raises(ValueError, match="twice"):
        es.parallel_train_step(lr_fn, mse, loss_metrics, devices=[d, d])
    with pytest.raises(ValueError, match="not divisible by the 2 devices"):
        es.shard(regression_batch(9), jax.local_devices()[:2])


@dataclasses.dataclass
class Note:  # a mutable dataclass: equal by value, unhashable
    text: str


class Tagged(eqx.Module):
    mlp: eqx.nn.MLP
    note: Any  # a non-array leaf of the state

    def __call__(self, x, *, key=None):
        return self.mlp(x)


def test_compile_cache_compares_static_leaves_by_value():
    # An unhashable non-array leaf is compared by value: an equal copy reuses the
    # compiled step, another value compiles another one.
    fn = parallel("sharded", donate=False)
    batch = es.shard(regression_batch(16))
    before = fn.cache_size  # pyright: ignore
    for text in ("a", "a", "b", "b"):
        new, _ = fn(es.TrainState.create(Tagged(mlp(), Note(text)), ADAM), batch)
        assert new.model.note == Note(text)
    assert fn.cache_size == before + 2  # pyright: ignore


# --- SCICO-style helpers --------------------------------------------------------------


def test_replicate_unreplicate_round_trip():
    state = es.TrainState.create(mlp(), ADAM)
    rep = es.replicate(state)
    assert rep.model.layers[0].weight.shape == (4, *state.model.layers[0].weight.shape)
    assert tree_equal(es.unreplicate(rep), state)


def test_sync_model_state_averages_float_leaves_only():
    model, ms = bn_net()
    rep = es.replicate(es.TrainState.create(model, ADAM, model_state=ms))
    noisy = jax.tree_util.tree_map(
        lambda x: (
            x + jnp.arange(4.0).reshape(4, *([1] * (x.ndim - 1)))
            if eqx.is_inexact_array(x)
            else x
        ),
        rep.model_state,
    )
    synced = es.sync_model_state(rep.replace(model_state=noisy))
    for a, b in zip(
        jax.tree_util.tree_leaves(synced.model_state), jax.tree_util.tree_leaves(ms)
    ):
        if eqx.is_inexact_array(b):
            np.testing.assert_allclose(
                a, np.broadcast_to(np.asarray(b) + 1.5, a.shape), rtol=1e-6
            )
        else:
            np.testing.assert_array_equal(a, np.broadcast_to(b, a.shape))

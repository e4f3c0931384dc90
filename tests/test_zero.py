"""Sharded optimizer state (`shard_optimizer_state=True`, ZeRO stage 1)."""

import functools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import max_rel_diff
from hypothesis import given, settings, strategies as st

import eqx_steps as es


LR = 1e-2
ADAM = optax.adam(LR)
SGDM = optax.sgd(LR, momentum=0.9, nesterov=True)
TXS = {"adam": ADAM, "sgdm": SGDM}
CLIPPED = optax.chain(optax.clip_by_global_norm(1.0), ADAM)


class Net(eqx.Module):
    """tanh(x W1 + b1) W2 + mean(u): leaf shapes chosen by the test."""

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    u: jax.Array

    def __init__(self, hidden: int, u_shape: tuple, seed: int = 0):
        k = jax.random.split(jax.random.key(seed), 4)
        self.w1 = jax.random.normal(k[0], (3, hidden)) / 2
        self.b1 = jax.random.normal(k[1], (hidden,)) / 4
        self.w2 = jax.random.normal(k[2], (hidden, 2)) / 2
        self.u = jax.random.normal(k[3], u_shape)

    def __call__(self, x, *, key=None):
        return jnp.tanh(x @ self.w1 + self.b1) @ self.w2 + jnp.mean(self.u**2)


def batch(n_devices: int, seed: int, steps: int = 0) -> dict:
    lead = (steps, n_devices) if steps else (n_devices,)
    k1, k2 = jax.random.split(jax.random.key(100 + seed))
    return {
        "image": jax.random.normal(k1, (*lead, 2, 3)),
        "label": jax.random.normal(k2, (*lead, 2, 2)),
    }


def clip_w1(model):
    return eqx.tree_at(lambda m: m.w1, model, jnp.clip(model.w1, -0.3, 0.3))


def averaging_train_step(state, batch, learning_rate_fn, criterion, metrics_fn, **kw):
    """A user's own step that averages the gradients itself, whatever the
    optimizer does with them."""
    axis_name = kw["axis_name"]

    def loss_fn(params):
        model = eqx.combine(params, eqx.filter(state.model, state.trainable, True))
        output, _ = state.forward(model, state.model_state, batch["image"])
        return criterion(output, batch["label"])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, axis_name)
    return state.apply_gradients(grads), {"loss": jax.lax.pmean(loss, axis_name)}


@functools.cache
def step(
    n_devices: int,
    zero: bool,
    steps_per_call: int = 1,
    post: bool = False,
    own_step: bool = False,
):
    return es.parallel_train_step(
        LR,
        es.mse_loss,
        es.compute_metrics,
        backend="sharded",
        devices=jax.local_devices()[:n_devices],
        steps_per_call=steps_per_call,
        post_lst=[clip_w1] if post else None,
        train_step_fn=averaging_train_step if own_step else es.train_step,
        shard_optimizer_state=zero,
    )


def run(fn, state, batches):
    for b in batches:
        state, metrics = fn(state, b)
    return state, metrics


def specs(state) -> list:
    return [x.sharding.spec for x in jax.tree_util.tree_leaves(state.opt_state)]


@settings(max_examples=6)  # two compiles per example
@given(
    n_devices=st.sampled_from([1, 2, 4]),
    hidden=st.sampled_from([3, 6, 8]),
    u_shape=st.sampled_from([(7,), (6, 5), (2, 3, 4), (12, 1)]),
    opt=st.sampled_from(sorted(TXS)),
)
@pytest.mark.slow
def test_sharded_optimizer_state_equals_the_replicated_step(
    n_devices, hidden, u_shape, opt
):
    state = es.TrainState.create(Net(hidden, u_shape), TXS[opt])
    batches = [batch(n_devices, i) for i in range(3)]
    ref, ref_metrics = run(step(n_devices, False), state, batches)
    out, metrics = run(step(n_devices, True), state, batches)
    assert max_rel_diff(out, ref) < 1e-6
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    # An ordinary state: the usual shapes, laid out over the devices.
    for a, b in zip(
        jax.tree_util.tree_leaves(out.opt_state),
        jax.tree_util.tree_leaves(ref.opt_state),
    ):
        assert a.shape == b.shape
    # A moment is cut when an axis of its parameter divides by the device count.
    shapes = [x.shape for x in jax.tree_util.tree_leaves(state.params)]
    divides = any(d % n_devices == 0 for s in shapes for d in s)
    cut = [s for s in specs(out) if "device" in s]
    assert bool(cut) == (n_devices > 1 and divides)


def test_each_device_holds_a_slice_of_the_moments():
    state, _ = step(4, True)(es.TrainState.create(Net(8, (7,)), ADAM), batch(4, 0))
    mu = state.opt_state[0].mu
    assert mu.w1.sharding.spec == jax.sharding.PartitionSpec(None, "device")
    assert {s.data.shape for s in mu.w1.addressable_shards} == {(3, 2)}
    assert mu.u.sharding.spec == jax.sharding.PartitionSpec()  # 7: kept whole


@pytest.mark.parametrize("post", [False, True])
def test_steps_per_call_and_post_lst_equal_the_replicated_step(post):
    state = es.TrainState.create(Net(8, (6, 5)), ADAM)
    batches = [batch(4, i, steps=2) for i in range(2)]
    ref, ref_metrics = run(step(4, False, 2, post), state, batches)
    out, metrics = run(step(4, True, 2, post), state, batches)
    assert max_rel_diff(out, ref) < 1e-6
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    if post:
        assert float(jnp.max(jnp.abs(out.model.w1))) <= np.float32(0.3)


def collectives(hlo: str) -> dict[str, list[set[str]]]:
    """For each collective of an optimised HLO module, the shapes of its results."""
    found: dict[str, list[set[str]]] = {}
    for line in hlo.splitlines():
        m = re.search(
            r"= (.*?) (all-reduce|reduce-scatter|all-gather)(-start)?\(", line
        )
        if m:
            shapes = set(re.findall(r"\[([\d,]*)\]", m.group(1)))
            found.setdefault(m.group(2), []).append(shapes)
    return found


def test_the_gradients_are_reduce_scattered():
    # Net(8, (6, 5)) on 4 devices: w1 (3, 8), b1 (8,), w2 (8, 2) are cut, each
    # gradient reduce-scattered into a quarter; u (6, 5) is kept whole and
    # all-reduced. No whole gradient of a cut leaf is all-reduced.
    state = es.TrainState.create(Net(8, (6, 5)), ADAM)
    hlo = step(4, True).lower(state, batch(4, 0)).compile().as_text()
    found = collectives(hlo)
    assert sorted(map(sorted, found["reduce-scatter"])) == [["2"], ["2,2"], ["3,2"]]
    reduced = set().union(*found["all-reduce"])
    assert "6,5" in reduced
    assert not reduced & {"3,8", "8", "8,2"}
    # One device: nothing cut, nothing reduced or gathered.
    hlo = step(1, True).lower(state, batch(1, 0)).compile().as_text()
    assert collectives(hlo) == {}


@pytest.mark.parametrize("n_devices", [2, 4])
def test_a_step_that_averages_the_gradients_itself_stays_correct(n_devices):
    # The reduce-scatter of gradients already averaged gives each device its slice.
    state = es.TrainState.create(Net(8, (6, 5)), ADAM)
    batches = [batch(n_devices, i) for i in range(2)]
    ref, ref_metrics = run(step(n_devices, False), state, batches)
    out, metrics = run(step(n_devices, True, own_step=True), state, batches)
    assert max_rel_diff(out, ref) < 1e-6
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    assert any("device" in s for s in specs(out))


def test_evaluation_leaves_the_sharded_optimizer_state_where_it_is():
    state, _ = step(4, True)(es.TrainState.create(Net(8, (6, 5)), ADAM), batch(4, 0))
    evaluate = es.parallel_eval_step(es.mse_loss, es.compute_metrics, backend="sharded")
    # The program's inputs: the state without its optimizer state, and the batch.
    (arrays, _), _ = evaluate.lower(state, batch(4, 1)).args_info
    n_opt = len(jax.tree_util.tree_leaves(state.opt_state))
    assert len(arrays) == len(jax.tree_util.tree_leaves(state)) - n_opt
    # No whole copy of a cut moment is made on the devices.
    cut = {
        x.shape
        for x in jax.tree_util.tree_leaves(state.opt_state)
        if "device" in x.sharding.spec
    }

    def whole_copies():
        return sum(
            a.shape in cut and a.sharding.is_fully_replicated for a in jax.live_arrays()
        )

    before, layout = whole_copies(), specs(state)
    metrics = evaluate(state, batch(4, 1))
    assert whole_copies() == before
    assert specs(state) == layout
    # A custom evaluation step gets the whole state (it may read the optimizer's).
    whole = es.parallel_eval_step(
        es.mse_loss,
        es.compute_metrics,
        eval_step_fn=lambda *args, **kw: es.eval_step(*args, **kw),
        backend="sharded",
    )
    (arrays, _), _ = whole.lower(state, batch(4, 1)).args_info
    assert len(arrays) == len(jax.tree_util.tree_leaves(state))
    ref = whole(state, batch(4, 1))
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-6)


def test_pmap_and_non_elementwise_optimizers_are_refused():
    with pytest.raises(ValueError, match="backend='sharded'"):
        es.parallel_train_step(
            LR, es.mse_loss, es.compute_metrics, shard_optimizer_state=True
        )
    with pytest.raises(TypeError, match="shard_optimizer_state"):
        es.parallel_train_step(
            LR,
            es.mse_loss,
            es.compute_metrics,
            backend="sharded",
            shard_optimizer_state="yes",  # pyright: ignore
        )
    with pytest.raises(ValueError, match="reduce_sum"):
        step(4, True)(es.TrainState.create(Net(8, (7,)), CLIPPED), batch(4, 0))


@pytest.mark.parametrize(
    "save_zero, save_n, load_zero, load_n",
    [(True, 4, False, 4), (False, 4, True, 4), (True, 4, True, 2), (True, 2, False, 1)],
)
def test_checkpoints_restore_across_layouts_and_device_counts(
    tmp_path, save_zero, save_n, load_zero, load_n
):
    fresh = es.TrainState.create(Net(8, (6, 5)), ADAM)
    saved, _ = run(step(save_n, save_zero), fresh, [batch(save_n, i) for i in range(2)])
    es.checkpoint_save(saved, None, tmp_path)
    # The target: a state in the other layout (one step taken, then restored over).
    target, _ = step(load_n, load_zero)(fresh, batch(load_n, 0))
    restored = es.checkpoint_restore(target, tmp_path)
    assert max_rel_diff(restored, saved) == 0.0
    assert int(restored.step) == int(saved.step)
    assert specs(restored) == specs(target)
    # Training goes on from the restored state as from the saved one.
    more = batch(load_n, 5)
    ref, _ = step(load_n, False)(saved, more)
    out, _ = step(load_n, load_zero)(restored, more)
    assert max_rel_diff(out, ref) < 1e-6


def test_the_trainer_shards_the_optimizer_state_on_request():
    # config["shard_optimizer_state"] reaches the parallel step: same records as the
    # replicated run.
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    ds = {
        "image": rng.random((32, 4), np.float32),
        "label": rng.random((32, 2), np.float32),
    }
    records = []
    for shard in (False, True):
        config = {
            "batch_size": 8,
            "num_epochs": 2,
            "backend": "sharded",
            "shard_optimizer_state": shard,
        }
        _, history = es.BasicTrainer(config, model, ds, ds).train()
        records.append(history.records[-1])
    for key in ("train_loss", "eval_loss"):
        np.testing.assert_allclose(records[1][key], records[0][key], rtol=1e-6)

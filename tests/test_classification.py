"""Classification through the steps: integer labels, `cross_entropy_loss` and
`classification_metrics` in the per-device and the parallel steps."""

import equinox as eqx
import jax
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import eqx_steps as es


N, FEATURES, CLASSES = 16, 4, 3
LR = 0.5
TX = optax.sgd(LR)
BACKENDS = ("pmap", "sharded")


def lr_fn(step):
    return LR


def dataset(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, FEATURES)).astype(np.float32)
    # Labels a linear rule can learn (the class of the largest of 3 features).
    return {"image": x, "label": np.argmax(x[:, :CLASSES], -1).astype(np.int32)}


def model(seed=0):
    return eqx.nn.Linear(FEATURES, CLASSES, key=jax.random.key(seed))


def np_metrics(linear, batch):
    logits = np.asarray(jax.vmap(linear)(batch["image"]), np.float64)
    labels = batch["label"]
    z = logits - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    loss = -np.take_along_axis(log_p, labels[:, None], -1).mean()
    return {"loss": loss, "accuracy": np.mean(logits.argmax(-1) == labels)}


TRAIN = {
    b: es.parallel_train_step(
        lr_fn, es.cross_entropy_loss, es.classification_metrics, backend=b, donate=False
    )
    for b in BACKENDS
}
EVAL = {
    b: es.parallel_eval_step(
        es.cross_entropy_loss, es.classification_metrics, backend=b
    )
    for b in BACKENDS
}


@eqx.filter_jit
def single_train(state, batch):
    return es.train_step(
        state,
        batch,
        lr_fn,
        es.cross_entropy_loss,
        es.classification_metrics,
        axis_name=None,
    )


@given(seed=st.integers(0, 2**16), backend=st.sampled_from(BACKENDS))
def test_parallel_eval_equals_numpy(seed, backend):
    state = es.TrainState.create(model(seed), TX)
    batch = dataset(seed)
    got = EVAL[backend](state, es.shard(batch))
    want = np_metrics(state.model, batch)
    # Equal shares per device: the mean of the per-device metrics is the
    # metric of the whole batch.
    np.testing.assert_allclose(float(got["loss"]), want["loss"], rtol=1e-5)
    assert float(got["accuracy"]) == pytest.approx(want["accuracy"], abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parallel_training_equals_one_device_and_learns(backend):
    batch = dataset(1)
    ours = theirs = es.TrainState.create(model(1), TX)
    first = None
    for _ in range(5):
        ours, metrics = TRAIN[backend](ours, es.shard(batch))
        theirs, single = single_train(theirs, batch)
        first = float(metrics["loss"]) if first is None else first
        np.testing.assert_allclose(
            float(metrics["accuracy"]), float(single["accuracy"]), atol=1e-6
        )
        np.testing.assert_allclose(
            float(metrics["loss"]), float(single["loss"]), rtol=1e-5
        )
    for a, b in zip(jax.tree.leaves(ours.model), jax.tree.leaves(theirs.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    final = np_metrics(ours.model, batch)
    assert final["loss"] < first and 0.0 <= final["accuracy"] <= 1.0

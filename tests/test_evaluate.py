"""Evaluation over a dataset by SCICO's definition (`evaluate_dataset`).

SCICO's definition: `metrics_fn` on each per-device batch, averaged over the
devices and over the batches; here the examples that do not fill a batch are one
smaller batch of their own, weighted by their count. The references below compute
that by hand, in NumPy, from the model's outputs.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings, strategies as st

import eqx_steps as es


N_DEVICES = 4
MODEL = eqx.nn.Linear(3, 2, key=jax.random.key(0))
STATE = es.TrainState.create(MODEL, optax.sgd(0.1))


def make_data(n, seed=0):
    rng = np.random.default_rng([n, seed])
    x = rng.normal(size=(n, 3)).astype(np.float32)
    noise = 0.5 * rng.normal(size=(n, 2)).astype(np.float32)
    return {"image": x, "label": np.asarray(jax.vmap(MODEL)(x)) + noise}


def outputs(dataset):
    return np.asarray(jax.vmap(MODEL)(dataset["image"]), np.float64)


# ---------------------------------------------------------------------------
# Metrics: the library's (JAX, per device) and the references (NumPy).


def f1_metrics(output, label, criterion):
    """An F1 score of the sign of the first feature: not a mean over examples."""
    pred, true = output[:, 0] > 0, label[:, 0] > 0
    tp = jnp.sum(pred & true)
    wrong = jnp.sum(pred != true)
    return {"f1": 2 * tp / jnp.maximum(2 * tp + wrong, 1)}


def np_scico(output, label):
    err = np.mean((output - label) ** 2)
    return {"loss": 0.5 * err, "snr": 10 * np.log10(np.var(label) / err)}


def np_f1(output, label):
    pred, true = output[:, 0] > 0, label[:, 0] > 0
    tp = np.sum(pred & true)
    return {"f1": 2 * tp / max(2 * tp + np.sum(pred != true), 1)}


METRICS = {
    # compute_metrics' SNR is one SNR over the whole per-device batch.
    "scico": (es.compute_metrics, np_scico),
    "f1": (f1_metrics, np_f1),
}


def scico_by_hand(np_metrics, output, label, batch_size, n_devices, max_batches=None):
    """SCICO's definition, the remainder as one more batch weighted by its size."""
    n = len(output)
    starts = list(range(0, n, batch_size))[:max_batches]
    sums, total = {}, 0
    for start in starts:
        rows = np.arange(start, min(start + batch_size, n))
        if len(rows) == batch_size:  # a full batch: per device, then the mean
            per_device = [
                np_metrics(output[r], label[r]) for r in np.split(rows, n_devices)
            ]
            m = {k: np.mean([d[k] for d in per_device]) for k in per_device[0]}
        else:  # the remainder: one batch on one device
            m = np_metrics(output[rows], label[rows])
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + len(rows) * v
        total += len(rows)
    return {k: v / total for k, v in sums.items()}


# ---------------------------------------------------------------------------
# Evaluation functions on 4 devices (the library's) and on fewer.


@functools.cache
def eval_fn_on(n_devices, metrics, backend):
    metrics_fn = METRICS[metrics][0]
    if n_devices == N_DEVICES:
        return es.parallel_eval_step(es.mse_loss, metrics_fn, backend=backend)
    # The library's eval_step on the first n_devices devices, each full batch of
    # the 4-device iterator regrouped over them.
    step = eqx.filter_pmap(
        lambda state, batch: es.eval_step(state, batch, es.mse_loss, metrics_fn),
        in_axes=(None, 0),
        out_axes=None,
        axis_name=es.DEVICE_AXIS,
        devices=jax.devices()[:n_devices],
    )

    def run(state, batch):
        return step(
            state,
            {
                k: np.asarray(x).reshape(n_devices, -1, *x.shape[2:])
                for k, x in batch.items()
            },
        )

    return run


def evaluate(dataset, batch_size, n_devices=N_DEVICES, metrics="scico", **kwargs):
    kwargs.setdefault("backend", "pmap")
    fn = eval_fn_on(n_devices, metrics, kwargs.pop("backend"))
    return es.evaluate_dataset(
        fn,
        kwargs.pop("state", STATE),
        dataset,
        batch_size,
        criterion=es.mse_loss,
        metrics_fn=METRICS[metrics][0],
        **kwargs,
    )


@st.composite
def cases(draw):
    batch_size = draw(st.sampled_from([4, 8]))
    n = draw(st.integers(0, 3)) * batch_size + draw(st.integers(0, batch_size - 1))
    return (
        max(n, 1),
        batch_size,
        draw(st.sampled_from([1, 2, 4])),
        draw(st.sampled_from(sorted(METRICS))),
        draw(st.sampled_from(["pmap", "sharded"])),
    )


def assert_metrics_close(got, want):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


@settings(max_examples=12)
@example((16, 8, 4, "scico", "pmap"))  # divides into batches
@example((21, 8, 2, "f1", "sharded"))  # a remainder of 5
@example((3, 4, 1, "scico", "pmap"))  # fewer examples than one batch
@given(cases())
def test_metrics_equal_scico_definition_by_hand(case):
    n, batch_size, n_devices, metrics, backend = case
    dataset = make_data(n)
    got = evaluate(dataset, batch_size, n_devices, metrics, backend=backend)
    want = scico_by_hand(
        METRICS[metrics][1], outputs(dataset), dataset["label"], batch_size, n_devices
    )
    assert_metrics_close(got, want)


def mean_label(output, label, criterion):
    return {"mean": jnp.mean(label), "mean_sq": jnp.mean(label**2)}


@pytest.mark.parametrize("n, batch_size", [(3, 8), (8, 8), (21, 8), (30, 4)])
def test_every_example_counts_once(n, batch_size):
    # A per-example mean, weighted by batch sizes, is the mean over the examples.
    dataset = make_data(n)
    fn = es.parallel_eval_step(es.mse_loss, mean_label)
    got = es.evaluate_dataset(
        fn, STATE, dataset, batch_size, criterion=es.mse_loss, metrics_fn=mean_label
    )
    label = dataset["label"].astype(np.float64)
    np.testing.assert_allclose(got["mean"], label.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["mean_sq"], (label**2).mean(), rtol=1e-5)


@pytest.mark.parametrize("max_batches", [1, 2, 3, 10])
def test_max_batches_counts_the_remainder_as_one(max_batches):
    dataset = make_data(21)  # batches of 8, 8 and 5
    got = evaluate(dataset, 8, max_batches=max_batches)
    want = scico_by_hand(
        np_scico, outputs(dataset), dataset["label"], 8, N_DEVICES, max_batches
    )
    assert_metrics_close(got, want)


def test_a_state_from_the_parallel_train_step():
    # Its arrays are replicated on every device; the remainder runs on one.
    train = es.parallel_train_step(None, es.mse_loss, es.compute_metrics, donate=False)
    state = es.TrainState.create(
        MODEL, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    )
    state, _ = train(state, es.shard(make_data(8, seed=1)))
    dataset = make_data(13)
    got = evaluate(dataset, 8, state=state)
    out = np.asarray(jax.vmap(state.model)(dataset["image"]), np.float64)
    assert_metrics_close(
        got, scico_by_hand(np_scico, out, dataset["label"], 8, N_DEVICES)
    )


def test_a_metric_that_is_not_a_scalar_is_named():
    def per_feature(output, label, criterion):
        return {"per_feature": jnp.mean((output - label) ** 2, axis=0)}

    fn = es.parallel_eval_step(es.mse_loss, per_feature)
    with pytest.raises(ValueError, match="'per_feature' of shape \\(2,\\)"):
        es.evaluate_dataset(
            fn, STATE, make_data(8), 8, criterion=es.mse_loss, metrics_fn=per_feature
        )


def test_a_remainder_needs_the_step_functions():
    fn = eval_fn_on(N_DEVICES, "scico", "pmap")
    dataset = make_data(21)
    with pytest.raises(ValueError, match="last 5.*criterion=.*metrics_fn="):
        es.evaluate_dataset(fn, STATE, dataset, 8)
    # Without the remainder (divisible, or stopped before it) they are not needed.
    got = es.evaluate_dataset(fn, STATE, dataset, 8, max_batches=2)
    assert_metrics_close(
        got, scico_by_hand(np_scico, outputs(dataset), dataset["label"], 8, 4, 2)
    )


def test_bad_arguments_are_named():
    fn = eval_fn_on(N_DEVICES, "scico", "pmap")
    with pytest.raises(ValueError, match="`dataset`.*'label'"):
        es.evaluate_dataset(fn, STATE, {"image": np.zeros((8, 3))}, 8)
    with pytest.raises(ValueError, match="`max_batches` must be an int >= 1"):
        evaluate(make_data(8), 8, max_batches=0)
    with pytest.raises(ValueError, match="`batch_size` = 6"):
        evaluate(make_data(8), 6)

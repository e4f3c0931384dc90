"""Stock Equinox stateful and stochastic layers in every backend.

`eqx.nn.BatchNorm` (modes "ema" and "batch"), `eqx.nn.SpectralNorm` and
`eqx.nn.Dropout`, each trained a few steps and evaluated through
`parallel_train_step` / `parallel_eval_step` (backends "pmap" and "sharded", 4
devices) and through the per-device steps with `axis_name=None` under
`eqx.filter_jit` (one device). One compiled step per backend is shared by the
layers (the parallel steps compile once per state structure).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_steps as es


N_DEVICES = 4
BATCH = 8  # two examples per device
STEPS = 3
MOMENTUM = 0.9
LR = 0.05
TX = optax.sgd(LR)


def metrics_fn(output, label, criterion):
    # Beside the loss, what tells the dropout keys apart: the spread of the
    # outputs over the examples of a device, and the first output and its square
    # (whose means over devices differ, E[y^2] > E[y]^2, only if the devices drew
    # different masks).
    first = output[0, 0]
    return {
        "loss": criterion(output, label),
        "example_spread": jnp.var(output[:, 0]),
        "first": first,
        "first_sq": first**2,
    }


class StatefulNet(eqx.Module):
    """Linear -> a stock stateful layer -> tanh -> Linear, on one feature vector."""

    lin1: eqx.nn.Linear
    layer: eqx.Module
    lin2: eqx.nn.Linear

    def __init__(self, kind, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.lin1 = eqx.nn.Linear(4, 3, key=k1)
        if kind == "spectral":
            self.layer = eqx.nn.SpectralNorm(
                eqx.nn.Linear(3, 3, key=k3), "weight", key=k3
            )
        else:
            mode = {"bn_ema": "ema", "bn_batch": "batch"}[kind]
            self.layer = eqx.nn.BatchNorm(3, "batch", momentum=MOMENTUM, mode=mode)
        self.lin2 = eqx.nn.Linear(3, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.layer(self.lin1(x), state)  # pyright: ignore[reportCallIssue]
        return self.lin2(jnp.tanh(h)), state


class DropNet(eqx.Module):
    """Linear -> tanh -> Dropout(0.5) -> Linear."""

    lin1: eqx.nn.Linear
    drop: eqx.nn.Dropout
    lin2: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(4, 8, key=k1)
        self.drop = eqx.nn.Dropout(0.5)
        self.lin2 = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x, *, key=None):
        return self.lin2(self.drop(jnp.tanh(self.lin1(x)), key=key))


def initial_state(kind):
    key = jax.random.key(0)
    if kind == "dropout":
        return es.TrainState.create(DropNet(key=key), TX, key=jax.random.key(1))
    model, model_state = eqx.nn.make_with_state(StatefulNet)(kind, key=key)
    if kind == "spectral":
        # Start the power iteration away from its fixed point, so that every step
        # visibly moves it.
        uv = (jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0]))
        model_state = model_state.set(model.layer.uv_index, uv)
    return es.TrainState.create(model, TX, model_state=model_state)


def make_batch(kind):
    x = jax.random.normal(jax.random.key(2), (BATCH, 4))
    if kind == "dropout":
        # Identical examples: any difference between outputs is the dropout mask.
        x = jnp.broadcast_to(x[:1], x.shape)
    label = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], -1)
    return {"image": x, "label": label}


def lr_fn(step):
    return LR


def _single_train(state, batch):
    return es.train_step(state, batch, lr_fn, es.mse_loss, metrics_fn, axis_name=None)


def _single_eval(state, batch):
    return es.eval_step(state, batch, es.mse_loss, metrics_fn, axis_name=None)


# One compiled step per backend, shared by every layer (and every test).
TRAIN = {
    "single": eqx.filter_jit(_single_train),
    **{
        b: es.parallel_train_step(
            lr_fn, es.mse_loss, metrics_fn, backend=b, donate=False
        )
        for b in ("pmap", "sharded")
    },
}
EVAL = {
    "single": eqx.filter_jit(_single_eval),
    **{
        b: es.parallel_eval_step(es.mse_loss, metrics_fn, backend=b)
        for b in ("pmap", "sharded")
    },
}
LAYERS = ("bn_ema", "bn_batch", "spectral", "dropout")
BACKENDS = ("pmap", "sharded", "single")


def n_devices(backend):
    return 1 if backend == "single" else N_DEVICES


def to_backend(batch, backend):
    return batch if backend == "single" else es.shard(batch)


def run(kind, backend):
    """Train STEPS steps; return the states (initial first) and the metrics."""
    state, batch = initial_state(kind), to_backend(make_batch(kind), backend)
    states, metrics = [state], []
    for _ in range(STEPS):
        state, m = TRAIN[backend](state, batch)
        states.append(state)
        metrics.append({k: float(v) for k, v in m.items()})
    return states, metrics


def hidden(state, x):
    return jax.vmap(state.model.lin1)(x)


def per_device_moments(h, devices):
    h = np.asarray(h, np.float64).reshape(devices, -1, h.shape[-1])
    return h.mean(axis=1).mean(axis=0), h.var(axis=1).mean(axis=0)


def check_batch_norm(kind, states, batch, devices):
    """The running statistics after the first step, by hand (per-device batch
    statistics averaged over devices, as SCICO's synchronised statistics)."""
    index = states[0].model.layer
    mean, var = per_device_moments(hidden(states[0], batch["image"]), devices)
    if kind == "bn_ema":
        assert bool(states[0].model_state.get(index.ema_first_time_index))
        for s in states[1:]:
            assert not bool(s.model_state.get(index.ema_first_time_index))
        # The first step fills the running statistics with the batch statistics.
        got_mean, got_var = states[1].model_state.get(index.ema_state_index)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=1e-4, atol=1e-6)
    else:
        counts = [int(s.model_state.get(index.batch_counter)) for s in states]
        assert counts == list(range(STEPS + 1))
        got_mean, got_var = states[1].model_state.get(index.batch_state_index)
        np.testing.assert_allclose(got_mean, (1 - MOMENTUM) * mean, atol=1e-6)
        np.testing.assert_allclose(
            got_var, MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-5, atol=1e-6
        )


def check_spectral_norm(states):
    """Each training step is one power iteration on the weight it starts from."""
    index = states[0].model.layer.uv_index
    for before, after in zip(states, states[1:]):
        w = np.asarray(before.model.layer.layer.weight, np.float64)
        _, v = before.model_state.get(index)
        u = w @ np.asarray(v, np.float64)
        u /= np.linalg.norm(u)
        v = w.T @ u
        v /= np.linalg.norm(v)
        got_u, got_v = after.model_state.get(index)
        np.testing.assert_allclose(got_u, u, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got_v, v, rtol=1e-4, atol=1e-6)


def check_dropout(metrics, devices):
    # Different keys per step: the same examples give different losses.
    losses = [m["loss"] for m in metrics]
    assert len(set(losses)) == len(losses)
    for m in metrics:
        assert m["example_spread"] > 0  # per example
        if devices > 1:  # per device
            assert m["first_sq"] > m["first"] ** 2 + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYERS)
def test_stock_layer_trains_and_evaluates(kind, backend):
    devices = n_devices(backend)
    states, metrics = run(kind, backend)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert [int(s.step) for s in states] == list(range(STEPS + 1))
    batch = make_batch(kind)
    if kind.startswith("bn_"):
        check_batch_norm(kind, states, batch, devices)
    elif kind == "spectral":
        check_spectral_norm(states)
    else:
        check_dropout(metrics, devices)

    # Evaluation: inference mode (running statistics, no dropout), nothing
    # changes, and the result is what the inference-mode model gives by hand.
    final = states[-1]
    ev = EVAL[backend](final, to_backend(batch, backend))
    again = EVAL[backend](final, to_backend(batch, backend))
    assert {k: float(v) for k, v in ev.items()} == {
        k: float(v) for k, v in again.items()
    }
    out, _ = es.per_example(
        final.model, final.model_state, batch["image"], inference=True
    )
    per_device = [
        float(es.mse_loss(o, y))
        for o, y in zip(
            np.split(np.asarray(out), devices),
            np.split(np.asarray(batch["label"]), devices),
        )
    ]
    np.testing.assert_allclose(float(ev["loss"]), np.mean(per_device), rtol=1e-5)
    if kind == "dropout":
        assert float(ev["example_spread"]) == pytest.approx(0.0, abs=1e-10)


class BatchedNet(eqx.Module):
    """A model written for whole batches (it vmaps itself), with an "ema"
    BatchNorm: for `forward=es.whole_batch`."""

    net: StatefulNet

    def __call__(self, x, state, *, key=None):
        return jax.vmap(
            self.net, in_axes=(0, None), out_axes=(0, None), axis_name="batch"
        )(x, state)


def test_ema_batch_norm_in_a_whole_batch_model():
    net, model_state = eqx.nn.make_with_state(StatefulNet)(
        "bn_ema", key=jax.random.key(0)
    )
    state = es.TrainState.create(
        BatchedNet(net), TX, model_state=model_state, forward=es.whole_batch
    )
    batch = make_batch("bn_ema")
    new, metrics = TRAIN["sharded"](state, es.shard(batch))
    assert np.isfinite(float(metrics["loss"]))
    flag = net.layer.ema_first_time_index
    assert bool(state.model_state.get(flag)) and not bool(new.model_state.get(flag))
    mean, _ = per_device_moments(jax.vmap(net.lin1)(batch["image"]), N_DEVICES)
    got_mean, _ = new.model_state.get(net.layer.ema_state_index)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-6)

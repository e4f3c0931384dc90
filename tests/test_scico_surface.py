"""SCICO's remaining trainer surface: `p_train_step` and `p_eval_step`."""

import equinox as eqx
import jax
import numpy as np

import eqx_steps as es


_X = np.random.default_rng(0).normal(size=(80, 6)).astype(np.float32)
_W = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
TRAIN = {"image": _X[:64], "label": _X[:64] @ _W}
TEST = {"image": _X[64:], "label": _X[64:] @ _W}


def test_p_train_step_and_p_eval_step_are_the_steps_train_uses():
    config = {"batch_size": 16, "num_epochs": 1, "log_every_steps": 4, "seed": 0}
    model = eqx.nn.Linear(6, 3, key=jax.random.key(0))
    trainer = es.BasicTrainer(config, model, TRAIN, TEST)
    by_hand = es.BasicTrainer(config, model, TRAIN, TEST)
    # SCICO's loop, by hand: state, metrics = trainer.p_train_step(state, batch)
    state = by_hand.state
    for _ in range(by_hand.num_steps):
        state, metrics = by_hand.p_train_step(state, next(by_hand.train_dt_iter))
    assert set(metrics) >= {"loss", "snr", "learning_rate"}
    trained, _ = trainer.train()
    assert int(state.step) == int(trained.step) == 4
    assert eqx.tree_equal(state.model, trained.model, rtol=1e-6, atol=1e-6)
    eval_metrics = by_hand.p_eval_step(state, next(by_hand.eval_dt_iter))
    want = es.compute_metrics(jax.vmap(state.model)(TEST["image"]), TEST["label"])
    np.testing.assert_allclose(np.mean(eval_metrics["loss"]), want["loss"], rtol=1e-5)

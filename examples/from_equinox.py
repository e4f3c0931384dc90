"""Coming from plain Equinox: two models trained three ways on the same batches.

A GRU language model on token ids and a model of two inputs `model(x, t)` are
each trained by a plain Equinox loop, by `eqx_steps.BasicTrainer` and by your
own loop over `eqx_steps.parallel_train_step`, on the same batches in the same
order. The three give the same loss (up to float rounding: the library averages
the gradients over the devices). `docs/coming-from-equinox.md` walks through it;
`tests/test_examples.py` runs it.

    python examples/from_equinox.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_steps as es


# --8<-- [start:tokens]
VOCAB, T = 8, 8


class GRULanguageModel(eqx.Module):
    """Next-token logits at each position of a sequence of token ids `(T,)`."""

    embed: eqx.nn.Embedding
    cell: eqx.nn.GRUCell
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(VOCAB, 8, key=k1)
        self.cell = eqx.nn.GRUCell(8, 16, key=k2)
        self.out = eqx.nn.Linear(16, VOCAB, key=k3)

    def __call__(self, ids):  # ids: int32 (T,), never cast to float
        def step(h, x):
            h = self.cell(x, h)
            return h, self.out(h)

        _, logits = jax.lax.scan(step, jnp.zeros(16), jax.vmap(self.embed)(ids))
        return logits  # (T, VOCAB)


def token_data(n=64, seed=0):
    """Sequences that count up modulo VOCAB from a random start: learnable."""
    start = np.random.default_rng(seed).integers(0, VOCAB, size=(n, 1))
    seq = (start + np.arange(T + 1)) % VOCAB
    return {"image": seq[:, :-1].astype(np.int32), "label": seq[:, 1:].astype(np.int32)}


# --8<-- [end:tokens]


# --8<-- [start:two_inputs]
class TwoInputs(eqx.Module):
    """A model of two inputs, called as `model(x, t)`: a vector and a class id."""

    mlp: eqx.nn.MLP
    embed: eqx.nn.Embedding

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.mlp = eqx.nn.MLP(4, 2, 16, 1, key=k1)
        self.embed = eqx.nn.Embedding(3, 2, key=k2)

    def __call__(self, x, t):
        return self.mlp(x) + self.embed(t)


def two_input_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    t = rng.integers(0, 3, size=(n,)).astype(np.int32)
    y = np.stack([np.sin(x[:, 0]) + t, x[:, 1] * x[:, 2]], -1).astype(np.float32)
    return {"image": (x, t), "label": y}  # the input is the tuple (x, t)


# --8<-- [end:two_inputs]


BATCH, STEPS = 16, 12
TX = optax.adam(1e-2)  # built once and shared: a new optax object recompiles


def batches(ds):
    """The batches of `ds` in order, cycling: what every loop below is fed."""
    n = len(jax.tree_util.tree_leaves(ds)[0])
    for step in range(STEPS):
        lo = (step * BATCH) % n
        yield jax.tree_util.tree_map(lambda a: a[lo : lo + BATCH], ds)


# --8<-- [start:plain]
def plain_equinox(model, ds, loss_fn, call):
    """The plain Equinox loop: `filter_value_and_grad`, optax, `filter_jit`."""
    opt_state = TX.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, inputs, labels):
        def loss(m):
            return loss_fn(jax.vmap(lambda i: call(m, i))(inputs), labels)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = TX.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, value

    for batch in batches(ds):
        model, opt_state, value = step(model, opt_state, batch["image"], batch["label"])
    return model, float(value)


# --8<-- [end:plain]


# --8<-- [start:trainer]
def with_trainer(model, ds, criterion, metrics_fn, forward):
    """`BasicTrainer`: the same batches in the same order (shuffle off)."""
    config = {
        "batch_size": BATCH,
        "num_steps": STEPS,  # a step count instead of epochs
        "shuffle": False,
        "log_every_steps": 1,  # a record per step: the last is the last batch's
        "criterion": criterion,
        "metrics_fn": metrics_fn,
    }
    trainer = es.BasicTrainer(config, model, ds, tx=TX, forward=forward)
    state, history = trainer.train()  # no test set: train metrics only
    return state.model, history.records[-1]["train_loss"]


# --8<-- [end:trainer]


# --8<-- [start:own_loop]
def own_loop(model, ds, criterion, metrics_fn, forward):
    """Your own loop over the library's data-parallel step."""
    state = es.TrainState.create(model, TX, forward=forward)
    step = es.parallel_train_step(None, criterion, metrics_fn)
    for batch in batches(ds):
        state, metrics = step(state, es.shard(batch))  # any PyTree batch
    return state.model, float(metrics["loss"])


# --8<-- [end:own_loop]


def _loss_metrics(output, label, criterion):
    return {"loss": criterion(output, label)}


def _token_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def main(verbose: bool = True) -> dict[str, dict[str, float]]:
    """Train both models three ways; the last batch's loss of each."""
    results = {}
    tokens = token_data()
    lm = GRULanguageModel(jax.random.key(0))
    results["tokens"] = {
        "plain": plain_equinox(lm, tokens, _token_loss, lambda m, i: m(i))[1],
        # The token ids stay int32: integer inputs are never cast.
        "trainer": with_trainer(
            lm, tokens, es.cross_entropy_loss, _loss_metrics, es.per_example
        )[1],
        "own_loop": own_loop(
            lm, tokens, es.cross_entropy_loss, _loss_metrics, es.per_example
        )[1],
    }
    two = two_input_data()
    model = TwoInputs(jax.random.key(1))
    mse = es.mean_squared_error  # the plain loop's mean((y - t)**2), not half of it
    results["two_inputs"] = {
        "plain": plain_equinox(
            model, two, lambda p, y: jnp.mean((p - y) ** 2), lambda m, i: m(*i)
        )[1],
        # The input is the tuple (x, t): `per_example_args` calls model(x, t).
        "trainer": with_trainer(model, two, mse, _loss_metrics, es.per_example_args)[1],
        "own_loop": own_loop(model, two, mse, _loss_metrics, es.per_example_args)[1],
    }
    if verbose:
        for name, losses in results.items():
            shown = ", ".join(f"{k} {v:.6f}" for k, v in losses.items())
            print(f"{name}: last-batch loss {shown}")
    return results


if __name__ == "__main__":
    main()

"""Shared test utilities."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """Whether two PyTrees have the same structure and allclose array leaves."""
    x_arr, x_static = eqx.partition(x, eqx.is_array)
    y_arr, y_static = eqx.partition(y, eqx.is_array)
    if jax.tree_util.tree_structure(x_arr) != jax.tree_util.tree_structure(y_arr):
        return False
    if not eqx.tree_equal(x_static, y_static):
        return False
    leaves = zip(jax.tree_util.tree_leaves(x_arr), jax.tree_util.tree_leaves(y_arr))
    return all(
        a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=atol)
        for a, b in leaves
    )


def tree_equal(x, y) -> bool:
    """Bit-exact equality of two PyTrees' array leaves and static parts."""
    return bool(eqx.tree_equal(x, y))


def max_rel_diff(x, y) -> float:
    """Largest relative difference between corresponding float leaves."""
    worst = 0.0
    for a, b in zip(
        jax.tree_util.tree_leaves(eqx.filter(x, eqx.is_inexact_array)),
        jax.tree_util.tree_leaves(eqx.filter(y, eqx.is_inexact_array)),
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-12)
        worst = max(worst, float(np.abs(a - b).max(initial=0.0) / scale))
    return worst


__all__ = ["tree_allclose", "tree_equal", "max_rel_diff", "jnp"]


# ---------------------------------------------------------------------------
# Small models shared by the tests of the core steps.

import optax  # noqa: E402


class BNNet(eqx.Module):
    """Linear -> BatchNorm -> tanh -> Linear, on one feature vector."""

    lin1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    lin2: eqx.nn.Linear

    def __init__(self, axis_name="batch", *, key):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(4, 8, key=k1)
        self.bn = eqx.nn.BatchNorm(8, axis_name=axis_name, mode="batch")
        self.lin2 = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.bn(self.lin1(x), state)
        return self.lin2(jnp.tanh(h)), state


class DropNet(eqx.Module):
    """An MLP with dropout: its output depends on the key it is given."""

    mlp: eqx.nn.MLP
    drop: eqx.nn.Dropout

    def __init__(self, *, key):
        self.mlp = eqx.nn.MLP(4, 2, 8, 1, key=key)
        self.drop = eqx.nn.Dropout(0.5)

    def __call__(self, x, *, key=None):
        return self.mlp(self.drop(x, key=key))


def mlp(seed=0):
    return eqx.nn.MLP(4, 2, 8, 2, key=jax.random.key(seed))


def bn_net(axis_name="batch", seed=0):
    return eqx.nn.make_with_state(BNNet)(axis_name, key=jax.random.key(seed))


def regression_batch(n, seed=0):
    x = jax.random.normal(jax.random.key(100 + seed), (n, 4))
    return {"image": x, "label": jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], -1)}


def mse(output, label):
    return jnp.mean((output - label) ** 2)


def loss_metrics(output, label, criterion):
    return {"loss": criterion(output, label)}


lr_fn = optax.exponential_decay(0.05, transition_steps=1, decay_rate=0.9)


ADAM = optax.adam(lr_fn)
SGD = optax.sgd(0.1, momentum=0.9, nesterov=True)


def leaves_equal(x, y) -> bool:
    """Bit-exact equality of the array leaves of two PyTrees (static parts ignored)."""
    xs = jax.tree_util.tree_leaves(eqx.filter(x, eqx.is_array))
    ys = jax.tree_util.tree_leaves(eqx.filter(y, eqx.is_array))
    return len(xs) == len(ys) and all(
        a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(xs, ys)
    )


def has_primitive(jaxpr, name: str) -> bool:
    """Whether `jaxpr` or a jaxpr nested in its equations uses primitive `name`."""
    from jax.extend.core import subjaxprs

    return any(eqn.primitive.name == name for eqn in jaxpr.eqns) or any(
        has_primitive(sub, name) for sub in subjaxprs(jaxpr)
    )

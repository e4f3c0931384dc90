"""Classify handwritten digits with a small CNN: eqx_steps beside a plain Equinox loop.

The digits are scikit-learn's bundled copy of the UCI handwritten digits (1797
images, 8x8), stored in `examples/data/digits.npz` (see its README for the
licences), so nothing is downloaded. The same CNN, from the same initial weights,
is trained twice on the same batches with the same optimizer:

1. with `eqx_steps`: `TrainState`, `parallel_train_step` and `parallel_eval_step`
   on every local device, with `cross_entropy_loss` and `classification_metrics`;
2. with a plain Equinox loop: one `eqx.filter_jit` step on one device.

The two compute the same mathematics (the mean of the per-device gradients of equal
shares of a batch is the gradient of the batch), so they reach the same test
accuracy; the script prints both accuracies, the time per training step of each,
and their ratio.

Run with `python examples/classify_digits.py [--epochs N]`. On a machine without an
accelerator it splits the CPU into 4 devices so the data-parallel path is exercised.
"""

import argparse
import os
import pathlib
import time


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import eqx_steps as es  # noqa: E402


DATA = pathlib.Path(__file__).parent / "data" / "digits.npz"


def load_digits(n_test: int = 360, seed: int = 0):
    """Train and test sets `{"image": (N, 1, 8, 8) float32 in [0, 1], "label": (N,)
    int32}`, split at random (seeded): `n_test` test images, the rest for training."""
    with np.load(DATA) as data:
        images = data["images"].astype(np.float32)[:, None] / 16.0
        labels = data["labels"].astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:n_test], order[n_test:]
    return (
        {"image": images[train], "label": labels[train]},
        {"image": images[test], "label": labels[test]},
    )


class CNN(eqx.Module):
    """Two 3x3 convolutions (the second with stride 2) and a linear classifier."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k2)
        self.head = eqx.nn.Linear(32 * 4 * 4, 10, key=k3)

    def __call__(self, x, *, key=None):
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.head(jnp.ravel(x))


def batches(dataset, batch_size: int, epochs: int, seed: int | None):
    """The batches of `epochs` passes over `dataset`, reshuffled every epoch (in
    order when `seed` is `None`); the last partial batch of an epoch is dropped."""
    n = len(dataset["label"])
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = np.arange(n) if seed is None else rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield {k: v[idx] for k, v in dataset.items()}


# --- the plain Equinox loop ---------------------------------------------------


def plain_loss(model, x, y):
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


@eqx.filter_jit
def plain_step(model, opt_state, tx, x, y):
    loss, grads = eqx.filter_value_and_grad(plain_loss)(model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, loss


@eqx.filter_jit
def plain_accuracy(model, x, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), -1) == y)


# --- the two runs ---------------------------------------------------------------


def _timed(step, carry, train_batches):
    """Run `carry = step(carry, batch)` over the batches; return the final carry and
    the seconds per step after the first (which compiles)."""
    carry = jax.block_until_ready(step(carry, train_batches[0]))
    start = time.perf_counter()
    for batch in train_batches[1:]:
        carry = step(carry, batch)
    carry = jax.block_until_ready(carry)
    return carry, (time.perf_counter() - start) / max(len(train_batches) - 1, 1)


def train_eqx_steps(model, tx, schedule, train_batches, test, eval_batch_size):
    """Train with eqx_steps on every local device; the model, the test accuracy
    and the seconds per step."""
    train = es.parallel_train_step(
        schedule, es.cross_entropy_loss, es.classification_metrics
    )
    evaluate = es.parallel_eval_step(es.cross_entropy_loss, es.classification_metrics)

    def step(state, batch):
        return train(state, es.shard(batch))[0]

    state, seconds = _timed(step, es.TrainState.create(model, tx), train_batches)
    # Equal batches: the mean over batches is the accuracy over the test set.
    accuracy = np.mean(
        [
            float(evaluate(state, es.shard(batch))["accuracy"])
            for batch in batches(test, eval_batch_size, epochs=1, seed=None)
        ]
    )
    return state.model, float(accuracy), seconds


def train_plain(model, tx, train_batches, test):
    """Train with a plain `eqx.filter_jit` loop on one device; the model, the test
    accuracy and the seconds per step."""

    def step(carry, batch):
        model, opt_state = carry
        model, opt_state, _ = plain_step(
            model, opt_state, tx, batch["image"], batch["label"]
        )
        return model, opt_state

    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    (model, _), seconds = _timed(step, (model, opt_state), train_batches)
    accuracy = float(plain_accuracy(model, test["image"], test["label"]))
    return model, accuracy, seconds


def max_relative_difference(a, b) -> float:
    """The largest difference between the weights of two models, relative to the
    largest weight of each layer."""
    worst = 0.0
    for x, y in zip(
        jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array)),
    ):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
    return worst


def main(
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, float]:
    """Train the CNN both ways and compare.

    **Arguments:**

    - `epochs`: passes over the 1437 training images.
    - `batch_size`: the global batch, a multiple of the local device count.
    - `learning_rate`: Adam's learning rate (constant).
    - `seed`: the seed of the initial weights, the split and the shuffling.
    - `verbose`: print the comparison.

    **Returns:**

    A dict with both test accuracies, both times per step (ms), their ratio
    (eqx_steps / plain), the largest relative difference of the two trained
    models' weights, the number of steps and of test images.
    """
    train, test = load_digits(seed=seed)
    train_batches = list(batches(train, batch_size, epochs, seed))
    model = CNN(key=jax.random.key(seed))
    schedule = optax.constant_schedule(learning_rate)
    tx = optax.adam(schedule)  # one optimizer object for both runs

    ours, our_accuracy, our_seconds = train_eqx_steps(
        model, tx, schedule, train_batches, test, eval_batch_size=40
    )
    plain, plain_accuracy_, plain_seconds = train_plain(model, tx, train_batches, test)
    result = {
        "steps": float(len(train_batches)),
        "test_images": float(len(test["label"])),
        "eqx_steps_accuracy": our_accuracy,
        "plain_accuracy": plain_accuracy_,
        "eqx_steps_ms_per_step": 1e3 * our_seconds,
        "plain_ms_per_step": 1e3 * plain_seconds,
        "time_ratio": our_seconds / plain_seconds,
        "max_weight_rel_diff": max_relative_difference(ours, plain),
    }
    if verbose:
        devices = jax.local_device_count()
        print(
            f"digits: {len(train['label'])} train / {len(test['label'])} test images, "
            f"{len(train_batches)} steps of batch {batch_size}"
        )
        print(
            f"eqx_steps ({devices} devices): test accuracy "
            f"{our_accuracy:.4f}, {result['eqx_steps_ms_per_step']:.2f} ms/step"
        )
        print(
            f"plain eqx.filter_jit (1 device): test accuracy "
            f"{plain_accuracy_:.4f}, {result['plain_ms_per_step']:.2f} ms/step"
        )
        print(
            f"time ratio eqx_steps / plain: {result['time_ratio']:.2f}; largest "
            f"relative weight difference {result['max_weight_rel_diff']:.1e}"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.epochs, args.batch_size, args.learning_rate, args.seed)

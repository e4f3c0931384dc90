"""Write your own training loop: `TrainState`, `parallel_train_step`,
`parallel_eval_step`, on every local device.

The one-screen example of the README, complete: a small residual denoising CNN with
batch normalisation, trained on synthetic noisy phantoms with Adam and a cosine
schedule, evaluated on a test batch, then saved to a model file and read back.

Run with `python examples/own_loop.py [--steps N]`. On a machine without an
accelerator it splits the CPU into devices, so the data-parallel path is the one
exercised. This is the code of the tutorial "Write your own loop";
`tests/test_docs.py` runs it with tiny settings.
"""

import argparse
import pathlib
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_steps as es


# --8<-- [start:model]
class MyNet(eqx.Module):
    """A residual denoiser: conv, batch norm, ReLU, conv; predicts the noise."""

    conv1: eqx.nn.Conv2d
    norm: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d

    def __init__(self, channels: int = 1, filters: int = 16, *, key):
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv2d(channels, filters, 3, padding=1, key=k1)
        # axis_name="batch": statistics over the examples of a device (the steps
        # vmap the model with that axis name), then averaged over the devices.
        self.norm = eqx.nn.BatchNorm(filters, axis_name="batch", mode="ema")
        self.conv2 = eqx.nn.Conv2d(filters, channels, 3, padding=1, key=k2)

    def __call__(self, x, state, *, key=None):
        """One example `(height, width, channels)` and the model state."""
        y = jnp.moveaxis(x, -1, 0)  # Equinox convolutions are channels-first
        y, state = self.norm(self.conv1(y), state)
        y = self.conv2(jax.nn.relu(y))
        return x - jnp.moveaxis(y, 0, -1), state


# --8<-- [end:model]


def batches(dataset, batch_size: int, steps: int, seed: int = 0):
    """`steps` random batches of `dataset` (a dict of arrays)."""
    rng = np.random.default_rng(seed)
    n = len(dataset["image"])
    for _ in range(steps):
        idx = rng.choice(n, batch_size, replace=False)
        yield {k: v[idx] for k, v in dataset.items()}


def main(steps: int = 200, batch_size: int = 32, n_train: int = 1024) -> dict:
    """Train, evaluate, save and reload; the test SNR of the noisy input and the
    test metrics of the trained and of the reloaded model.

    **Arguments:**

    - `steps`: training steps.
    - `batch_size`: the global batch, a multiple of the local device count.
    - `n_train`: the number of training patches.

    **Returns:**

    `{"noisy_snr": dB, "after": metrics, "reloaded": metrics}` on the test batch.
    """
    train_ds, test_ds = es.synthetic.make_denoising_data(n_train, 64, noise_std=0.1)
    test_batch = test_ds  # 64 patches: one batch

    # --8<-- [start:loop]
    model, model_state = eqx.nn.make_with_state(MyNet)(key=jax.random.key(0))
    schedule = optax.cosine_decay_schedule(3e-3, steps)
    state = es.TrainState.create(model, optax.adam(schedule), model_state=model_state)

    step = es.parallel_train_step(schedule, es.mse_loss, es.compute_metrics)
    evaluate = es.parallel_eval_step(es.mse_loss, es.compute_metrics)

    for batch in batches(train_ds, batch_size, steps):  # {"image", "label"}
        state, metrics = step(state, es.shard(batch))  # every local device
    after = evaluate(state, es.shard(test_batch))  # {"loss", "snr"}
    noisy = float(es.snr(test_batch["label"], test_batch["image"]))
    print(f"test SNR: noisy {noisy:.2f} dB, denoised {float(after['snr']):.2f} dB")
    # --8<-- [end:loop]

    # --8<-- [start:save]
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "mynet.eqx"
        es.save_model(path, state.model, state.model_state)
        template, template_state = eqx.nn.make_with_state(MyNet)(key=jax.random.key(1))
        model, model_state = es.load_model(path, template, template_state)
    reloaded = state.replace(model=model, model_state=model_state)
    # --8<-- [end:save]
    return {
        "noisy_snr": noisy,
        "after": after,
        "reloaded": evaluate(reloaded, es.shard(test_batch)),
    }


if __name__ == "__main__":
    # Without an accelerator, split the CPU into devices before JAX starts.
    es.platform.configure_xla_flags(es.platform.default_cpu_devices())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)

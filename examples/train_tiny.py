"""Train a tiny MLP with `parallel_train_step` on every local device.

Run with `python examples/train_tiny.py`. On a machine without an accelerator it
splits the CPU into 4 devices so the data-parallel path is exercised.
"""

import os


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import eqx_steps as es  # noqa: E402


def main(steps: int = 20, global_batch: int = 64) -> None:
    key_model, key_data = jax.random.split(jax.random.key(0))
    model = eqx.nn.MLP(2, 1, 32, 2, key=key_model)
    schedule = optax.cosine_decay_schedule(3e-2, steps)
    state = es.TrainState.create(model, optax.adam(schedule))
    step = es.parallel_train_step(schedule, es.mse_loss, es.compute_metrics)

    print(f"{jax.local_device_count()} devices, global batch {global_batch}")
    for i in range(steps):
        x = jax.random.uniform(jax.random.fold_in(key_data, i), (global_batch, 2))
        y = jnp.sin(3 * x[:, :1]) * jnp.cos(2 * x[:, 1:])
        state, metrics = step(state, es.shard({"image": x, "label": y}))
        print(
            f"step {i + 1:3d}  loss {float(metrics['loss']):.5f}  "
            f"snr {float(metrics['snr']):6.2f} dB  "
            f"lr {float(metrics['learning_rate']):.4f}"
        )


if __name__ == "__main__":
    main()

"""The training run shared by the multi-process workers and the single-process check."""

import equinox as eqx
import jax

import eqx_steps as es
from eqx_steps.models import DnCNN
from eqx_steps.synthetic import make_denoising_data


def train(workdir):
    train_ds, test_ds = make_denoising_data(96, 20, size=8, noise_std=0.1, seed=0)
    model, model_state = eqx.nn.make_with_state(DnCNN)(
        depth=3, channels=1, num_filters=8, key=jax.random.key(0)
    )
    config = {
        "batch_size": 16,
        "num_epochs": 1,
        "base_learning_rate": 1e-2,
        "backend": "sharded",
        "checkpointing": True,
        "workdir": str(workdir),
        "log_every_steps": 3,
    }
    trainer = es.BasicTrainer(config, model, train_ds, test_ds, model_state=model_state)
    return trainer.train()

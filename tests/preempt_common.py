"""The run that tests/test_preemption.py and test_peer_failure.py interrupt."""

import equinox as eqx
import jax
import numpy as np

import eqx_steps as es
from eqx_steps.models import DnCNN
from eqx_steps.synthetic import make_denoising_data


NUM_STEPS = 24  # 2 epochs of 12 steps; periodic checkpoints at 12 and 24


def make_trainer(workdir, **options):
    train_ds, test_ds = make_denoising_data(192, 16, size=8, noise_std=0.1, seed=0)
    model, model_state = eqx.nn.make_with_state(DnCNN)(
        depth=3, channels=1, num_filters=8, key=jax.random.key(0)
    )
    config = {
        "batch_size": 16,
        "num_epochs": 2,
        "base_learning_rate": 1e-2,
        "backend": "sharded",
        "checkpointing": True,
        "workdir": str(workdir),
        "log_every_steps": 4,
        "steps_per_checkpoint": 12,
    }
    return es.BasicTrainer(
        config, model, train_ds, test_ds, model_state=model_state, **options
    )


def host_leaves(tree):
    """This process's copy of each array leaf, as NumPy."""
    out = []
    for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array)):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        out.append(np.asarray(x))
    return out

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


# --- a Grain input (tests/test_pipeline_distributed.py) ---------------------------

GRAIN_BATCH = 16


def grain_examples():
    import numpy as np

    rng = np.random.default_rng(11)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], -1).astype(np.float32)
    return [{"image": x[i], "label": y[i]} for i in range(len(x))]


def grain_input(mode):
    """`global`: the same endless MapDataset of shuffled global batches in every
    process. `process`: a DataLoader sharded by process, yielding each process's
    share of a global batch."""
    import grain

    examples = grain_examples()
    if mode == "global":
        ds = grain.MapDataset.source(examples).shuffle(seed=3).repeat()
        return ds.batch(GRAIN_BATCH, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        len(examples),
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=5,
    )
    share = GRAIN_BATCH // jax.process_count()
    return grain.DataLoader(
        data_source=examples,
        sampler=sampler,
        operations=[grain.transforms.Batch(share, drop_remainder=True)],
        worker_count=0,
    )


def grain_train(workdir, source, num_steps):
    model = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.key(0))
    config = {
        "batch_size": GRAIN_BATCH,
        "num_steps": num_steps,
        "opt_type": "SGD",
        "base_learning_rate": 0.05,
        "backend": "sharded",
        "checkpointing": True,
        "workdir": str(workdir),
        "steps_per_checkpoint": 2,
        "log_every_steps": 2,
    }
    state, _ = es.BasicTrainer(config, model, source).train()
    return state

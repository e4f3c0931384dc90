"""SCICO's side of `benchmarks/scico_examples.py`: runs under SCICO's Python only.

SCICO is never a dependency of this project; this file imports SCICO, Flax and
jax of a scratch environment and nothing of eqx_steps, e.g.

    /tmp/scico_venv/bin/python benchmarks/scico_examples_scico.py \\
        --data /tmp/scico_examples.npz --model modl --out /tmp/scico_modl.npz

It trains SCICO 0.0.7's `scico.flax.MoDLNet` (two stages: depth 1, then the full
depth from the first stage's variables, SCICO's `deconv_modl_train_foam1.py`) or
`ODPNet` with `ODPProxDcnvBlock` (`deconv_odp_train_foam1.py`) on the data file
written by `scico_examples.py`, with exactly the pieces SCICO's
`BasicFlaxTrainer` uses (`create_basic_train_state` with the recipe's SGD,
`train_step_post` with `clip_positive` under `jax.pmap(axis_name="batch")`, the
constant learning-rate schedule, `mse_loss`, `compute_metrics`), in the batch
order stored in the data file, so that both libraries see the same batches. The
initial variables come from `create_basic_train_state` with the trainer's key
(`split(PRNGKey(seed))[1]`) and are saved beside the test outputs, for the
library to start from the same weights. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import numpy as np


def _flatten(tree, prefix=""):
    if not hasattr(tree, "items"):
        return {prefix: np.asarray(tree)}
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", choices=("modl", "odp"), required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import jax_utils
    from scico import flax as sflax
    from scico.flax.inverse import ODPProxDcnvBlock
    from scico.flax.train.diagnostics import compute_metrics
    from scico.flax.train.learning_rate import create_cnst_lr_schedule
    from scico.flax.train.losses import mse_loss
    from scico.flax.train.state import create_basic_train_state
    from scico.flax.train.steps import train_step, train_step_post
    from scico.flax.train.traversals import clip_positive, construct_traversal
    from scico.linop import CircularConvolve

    d = dict(np.load(args.data, allow_pickle=False))
    recipe = json.loads(str(d["recipe"]))
    conf = recipe[args.model]
    size = d["train_image"].shape[1]
    op = CircularConvolve(h=jnp.asarray(d["psf"]), input_shape=(size, size))
    config = {
        "seed": recipe["seed"],
        "opt_type": "SGD",
        "momentum": recipe["momentum"],
        "base_learning_rate": recipe["learning_rate"],
        "batch_size": recipe["batch_size"],
    }
    lr_fn = create_cnst_lr_schedule(config)
    post = [
        partial(
            clip_positive,
            traversal=construct_traversal(conf["weight"]),
            minval=conf["minval"],
        )
    ]
    p_step = jax.pmap(
        partial(
            train_step_post,
            train_step_fn=train_step,
            learning_rate_fn=lr_fn,
            criterion=mse_loss,
            metrics_fn=compute_metrics,
            post_lst=post,
        ),
        axis_name="batch",
    )
    key = jax.random.split(jax.random.PRNGKey(recipe["seed"]))[1]
    ndev = jax.local_device_count()

    def make(depth):
        kw = dict(
            operator=op,
            depth=depth,
            channels=1,
            num_filters=conf["num_filters"],
            block_depth=conf["block_depth"],
        )
        if args.model == "modl":
            return sflax.MoDLNet(cg_iter=conf["cg_iter"], **kw)
        return sflax.ODPNet(odp_block=ODPProxDcnvBlock, **kw)

    order = d["order"]  # (epochs, steps per epoch, batch)
    stages = conf["stages"]  # [(depth, epochs), ...]
    saved, variables, epoch0, losses = {}, None, 0, []
    times, cpu_times = [], []
    for depth, epochs in stages:
        model = make(depth)
        state = create_basic_train_state(
            key, config, model, (size, size), lr_fn, variables
        )
        if variables is None:
            saved = _flatten({"params": state.params, "batch_stats": state.batch_stats})
        state = jax_utils.replicate(state)
        stage_times, stage_cpu = [], []
        for e in range(epoch0, epoch0 + epochs):
            for idx in order[e]:
                batch = {
                    "image": d["train_image"][idx].reshape(ndev, -1, size, size, 1),
                    "label": d["train_label"][idx].reshape(ndev, -1, size, size, 1),
                }
                t0, c0 = time.perf_counter(), time.process_time()
                state, metrics = p_step(state, batch)
                jax.block_until_ready((state, metrics))
                stage_times.append(time.perf_counter() - t0)
                stage_cpu.append(time.process_time() - c0)
            losses.append(float(np.mean(metrics["loss"])))
        epoch0 += epochs
        times.append(stage_times)
        cpu_times.append(stage_cpu)
        state = jax_utils.unreplicate(state)
        variables = {"params": state.params, "batch_stats": state.batch_stats}

    fmap = sflax.FlaxMap(model, variables)
    out = np.asarray(fmap(jnp.asarray(d["test_image"])))
    np.savez(args.out, output=out, **{f"init/{k}": v for k, v in saved.items()})
    print(
        json.dumps(
            {
                "library": "SCICO 0.0.7",
                "jax": jax.__version__,
                "model": args.model,
                "devices": ndev,
                "step_times_s": times,
                "step_cpu_s": cpu_times,
                "epoch_losses": losses,
            }
        )
    )


if __name__ == "__main__":
    main()

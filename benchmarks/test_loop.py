"""The whole training loop: `BasicTrainer.train()` beside a bare loop of its step.

The bare loop calls the same parallel step the trainer builds (same backend,
`donate=True`, `nan_policy="raise"`, the trainer's learning-rate schedule) on
batches placed on the devices beforehand, and waits for the last one. The trainer
runs one epoch of the same number of steps from its own input iterator (shuffle,
stacking, placement, prefetch), its hooks (metrics collected every step, one
record with one evaluation batch at the end) and its non-finite check, with
logging and checkpoints off. Both are compiled before timing; the two alternate
round by round (`extra_info["trainer_s"]`, `["bare_s"]`, per step), so their
ratio compares two measurements under the same load. `report.py` prints
`loop_table`. With `--benchmark-disable` every case runs one short round.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
import workloads as w

import eqx_steps as es


STEPS = {"tiny": 200, "dncnn": 20}
QUICK_STEPS = 4


def dataset(workload: str, sizes: w.Sizes, n_batches: int) -> dict[str, np.ndarray]:
    """`n_batches` global batches of the workload as one dataset (host arrays)."""
    parts = [w.batch(workload, sizes, seed=i) for i in range(n_batches)]
    return {
        k: np.concatenate(
            [np.asarray(p[k]).reshape(-1, *p[k].shape[2:]) for p in parts]
        )
        for k in ("image", "label")
    }


class Loops:
    """A trainer and a bare loop of the same step over the same data."""

    def __init__(self, workload: str, backend: str, quick: bool, workdir: str):
        sizes = (w.QUICK_SIZES if quick else w.SIZES)[workload]
        self.steps = QUICK_STEPS if quick else STEPS[workload]
        ds = dataset(workload, sizes, self.steps)
        model, model_state = w.library_model(workload, sizes)
        config = {
            "batch_size": sizes.batch,
            "num_epochs": 1,
            "log_every_steps": self.steps,
            "steps_per_eval": 1,
            "backend": backend,
            "workdir": workdir,
        }
        self.trainer = es.BasicTrainer(
            config, model, ds, ds, model_state=model_state, tx=w.TX
        )
        self.start = self.trainer.state
        self.step = es.parallel_train_step(
            self.trainer.lr_schedule,
            es.mse_loss,
            es.compute_metrics,
            backend=backend,
            donate=True,
            nan_policy="raise",
        )
        self.batches = [
            w.batch(workload, sizes, seed=i) for i in range(self.steps)
        ]  # placed on the devices, as the bare loop's input

    def run_trainer(self) -> float:
        self.trainer.state = self.start  # the first call copies it: reusable
        t0 = time.perf_counter()
        state, _ = self.trainer.train()
        jax.block_until_ready(state)
        return (time.perf_counter() - t0) / self.steps

    def run_bare(self) -> float:
        state = self.start
        t0 = time.perf_counter()
        for b in self.batches:
            state, metrics = self.step(state, b)
        jax.block_until_ready((state, metrics))
        return (time.perf_counter() - t0) / self.steps


@pytest.mark.parametrize("backend", ["pmap", "sharded"])
@pytest.mark.parametrize("workload", ["tiny", "dncnn"])
def test_loop(benchmark, workload, backend, quick, tmp_path):
    loops = Loops(workload, backend, quick, str(tmp_path))
    loops.run_trainer(), loops.run_bare()  # compile both
    rounds = 1 if quick else 5
    trainer_s, bare_s = [], []

    def one_round():
        trainer_s.append(loops.run_trainer())
        bare_s.append(loops.run_bare())

    benchmark.group = "loop"
    benchmark.pedantic(one_round, rounds=rounds)
    benchmark.extra_info.update(
        workload=workload,
        backend=backend,
        devices=jax.device_count(),
        steps=loops.steps,
        trainer_s=trainer_s,
        bare_s=bare_s,
        ratio=float(np.median(trainer_s) / np.median(bare_s)),
    )
    assert len(trainer_s) == rounds

"""`eqx-steps train` beside a bare loop of its training step.

The command runs in-process as a user runs it (`eqx_steps.cli.main(["train",
...])`): its model and optimizer (DnCNN depth 6, 32 filters, batch 16, Adam), on
a small synthetic set (32x32 patches, 256 for training, 64 for testing, 2
epochs: 32 steps), with its progress bar and log lines, `metrics.jsonl`, an
evaluation of the whole test set at each of its ~15 log points and a checkpoint
per epoch. Its time per step comes from `metrics.jsonl`: from the second record
(the training and evaluation steps are compiled by then) to the last, the
difference of `"time"` over that of `"step"`. The bare loop runs the same
parallel step (the command's trainer configuration, `donate=True`) on batches
placed beforehand, for as many steps. The two alternate round by round.

What the command does beyond its steps is real work: the evaluations and the
checkpoint saves inside the timed interval are measured on their own in each
round (one evaluation pass of the test set, one `checkpoint_save`; medians) and
reported per step of the interval (`extra_info["eval_s"]`, `["checkpoint_s"]`),
so `report.py`'s loop table can say how much of the difference they are.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time

import equinox as eqx
import jax
import numpy as np
import pytest

import eqx_steps as es
from eqx_steps.cli import main
from eqx_steps.cli.train import trainer_config


# The command's defaults, on a small synthetic set; QUICK: one short round.
SIZES = {"patch": 32, "train_size": 256, "test_size": 64, "epochs": 2}
QUICK_SIZES = {"patch": 8, "train_size": 32, "test_size": 16, "epochs": 1}
COMMON = {"lr": 3e-3, "seed": 0, "noise": 0.2}
DEFAULTS = {"depth": 6, "filters": 32, "batch_size": 16, **COMMON}
QUICK_DEFAULTS = {"depth": 2, "filters": 4, "batch_size": 8, **COMMON}


class Command:
    """The command's runs, and a bare loop of the same step on the same shapes."""

    def __init__(self, backend: str, quick: bool, workdir: str):
        self.backend, self.workdir = backend, workdir
        self.settings = {
            **(QUICK_DEFAULTS if quick else DEFAULTS),
            **(QUICK_SIZES if quick else SIZES),
            "backend": backend,
            "steps_per_call": 1,
        }
        s = self.settings
        self.runs = self.saves = 0
        # The command's trainer, without its log and checkpoints: its initial
        # state, step and evaluation for the bare loop and the measurements.
        config = trainer_config(s, os.path.join(workdir, "bare"))
        config.update(log=False, checkpointing=False)
        model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
            depth=s["depth"],
            channels=1,
            num_filters=s["filters"],
            key=jax.random.fold_in(jax.random.key(s["seed"]), 1),
        )
        train_ds, test_ds = es.synthetic.make_denoising_data(
            s["train_size"],
            s["test_size"],
            size=s["patch"],
            channels=1,
            noise_std=s["noise"],
            seed=s["seed"],
        )
        self.trainer = es.BasicTrainer(
            config, model, train_ds, test_ds, model_state=model_state
        )
        cfg = self.trainer.config
        self.step = es.parallel_train_step(
            self.trainer.lr_schedule,
            cfg.criterion,
            cfg.metrics_fn,
            post_lst=cfg.post_lst,
            train_step_fn=cfg.train_step_fn,
            backend=backend,
            donate=True,
            nan_policy=cfg.nan_policy,
        )
        self.start = self.trainer.state
        self.batches: list = []

    def argv(self, out: str) -> list[str]:
        s = self.settings
        options = ["out", "backend", *DEFAULTS, *SIZES]
        values = {**s, "out": out}
        argv = ["train"]
        for name in options:
            argv += ["--" + name.replace("_", "-"), str(values[name])]
        return argv

    def run_command(self) -> tuple[float, int, list[dict]]:
        """One run of the command: its time per step from its second record to
        its last, the steps of that interval, and its records."""
        self.runs += 1
        out = os.path.join(self.workdir, f"run{self.runs}")
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(self.argv(out)) == 0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        first, last = records[min(1, len(records) - 1)], records[-1]
        steps = last["step"] - first["step"]
        if steps == 0:  # a quick run with a single record: the whole run
            first, steps = {"time": 0.0, "step": 0}, last["step"]
        return (last["time"] - first["time"]) / steps, steps, records

    def run_bare(self, steps: int) -> float:
        while len(self.batches) < steps:  # placed before any timing
            self.batches.append(jax.block_until_ready(next(self.trainer.train_dt_iter)))
        state = self.start
        t0 = time.perf_counter()
        for b in self.batches[:steps]:
            state, metrics = self.step(state, b)
        jax.block_until_ready((state, metrics))
        return (time.perf_counter() - t0) / steps

    def time_extras(self) -> tuple[float, float]:
        """The time of one evaluation pass of the test set and of one checkpoint
        save, as the command does them."""
        state, config = self.start, self.trainer.config.to_dict()
        t0 = time.perf_counter()
        jax.block_until_ready(self.trainer.evaluate(state))
        t1 = time.perf_counter()
        self.saves += 1
        es.checkpoint_save(state, config, os.path.join(self.workdir, f"s{self.saves}"))
        return t1 - t0, time.perf_counter() - t1


def beyond_steps(
    records: list[dict], every: int, eval_s: float, save_s: float
) -> dict[str, float]:
    """The evaluations and checkpoint saves inside a run's timed interval (from
    its second record to its last), in seconds per step of the interval."""
    first = records[min(1, len(records) - 1)]["step"]
    last = records[-1]["step"]
    steps = max(last - first, 1)
    # Each record evaluates right after taking its time, and a checkpoint at a
    # record's step is saved after it: the interval holds the evaluations of the
    # records before the last, and the saves at steps in [first, last).
    n_evals = max(len(records) - 2, 0)
    n_saves = sum(1 for s in range(max(first, 1), last) if s % every == 0)
    return {
        "eval_s": n_evals * eval_s / steps,
        "checkpoint_s": n_saves * save_s / steps,
        "evaluations": n_evals,
        "checkpoints": n_saves,
    }


@pytest.mark.parametrize("backend", ["pmap", "sharded"])
def test_command(benchmark, backend, quick, tmp_path):
    command = Command(backend, quick, str(tmp_path))
    _, steps, _ = command.run_command()  # compiles the command's steps
    command.run_bare(steps)  # and the bare loop's,
    command.time_extras()  # and the evaluation, and sets up orbax
    rounds = 1 if quick else 3
    command_s, bare_s, eval_s, save_s, runs = [], [], [], [], []

    def one_round():
        per_step, steps, records = command.run_command()
        command_s.append(per_step)
        runs.append(records)
        bare_s.append(command.run_bare(steps))
        evaluation, save = command.time_extras()
        eval_s.append(evaluation)
        save_s.append(save)

    benchmark.group = "loop"
    benchmark.pedantic(one_round, rounds=rounds)
    records = runs[-1]
    benchmark.extra_info.update(
        workload="command",
        backend=backend,
        devices=jax.device_count(),
        steps=steps,
        trainer_s=command_s,
        bare_s=bare_s,
        ratio=float(np.median(command_s) / np.median(bare_s)),
        **beyond_steps(
            records,
            command.trainer.steps_per_checkpoint,
            float(np.median(eval_s)),
            float(np.median(save_s)),
        ),
    )
    assert len(command_s) == rounds and all(t > 0 for t in command_s)

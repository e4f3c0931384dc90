"""Grain inputs across processes (issue 22): 2 processes x 2 CPU devices over
loopback, as tests/test_distributed.py runs them. A run interrupted at a
checkpoint and resumed ends bit-identical to the uninterrupted run; a pipeline of
global batches resumes on another device and process count; a pipeline sharded
by process refuses to, naming both counts."""

import os
import shutil
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import max_rel_diff
from mp_common import grain_input, grain_train
from test_distributed import finish, free_port

import eqx_steps as es


HERE = os.path.dirname(os.path.abspath(__file__))


def _launch(jobs, mode, processes=2, local_devices=2):
    """One launch of a `processes`-process job that runs `jobs`, a list of
    `(outdir, num_steps)`, in turn: per job, every process's final arrays."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "mp_grain_worker.py"),
                coordinator,
                str(processes),
                str(i),
                mode,
                str(local_devices),
                *(f"{outdir}:{steps}" for outdir, steps in jobs),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        for i in range(processes)
    ]
    outputs = finish(procs, limit_s=240)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    results = []
    for outdir, _ in jobs:
        states = [
            np.load(os.path.join(outdir, f"state-{i}.npz")) for i in range(processes)
        ]
        results.append([[s[k] for k in s.files] for s in states])
    return results


def _equal(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per mode: the uninterrupted 8-step run, and a run stopped at step 4 then
    resumed to 8 (its step-4 checkpoint kept in `at4`)."""
    out = {}
    for mode in ("global", "process"):
        root = tmp_path_factory.mktemp(mode)
        whole, _ = _launch([(root / "whole", 8), (root / "split", 4)], mode)
        shutil.copytree(root / "split" / "ckpt", root / "at4")
        (resumed,) = _launch([(root / "split", 8)], mode)  # a fresh job resumes
        out[mode] = whole, resumed, root / "at4"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["global", "process"])
def test_two_processes_resume_bit_identical(runs, mode):
    whole, resumed, at4 = runs[mode]
    _equal(whole[0], whole[1])  # every process holds the same state
    _equal(whole[0], resumed[0])
    _equal(resumed[0], resumed[1])
    saved = es.load_data_state(at4)
    assert saved is not None and saved["step"] == 4 and saved["rows"] == mode
    assert len(saved["states"]) == (2 if mode == "process" else 1)


@pytest.mark.slow
def test_global_batches_resume_on_another_device_count(runs, tmp_path):
    """Stopped on 2 processes x 2 devices, resumed on 1 process x 2 devices and on
    this one (1 x 4): the same batches, so the same final state up to the
    order of the floating-point sums over devices."""
    whole, _, at4 = runs["global"]
    shutil.copytree(at4, tmp_path / "two" / "ckpt")
    ((two,),) = _launch([(tmp_path / "two", 8)], "global", 1, local_devices=2)
    assert max_rel_diff(whole[0], two) < 1e-6
    shutil.copytree(at4, tmp_path / "four")
    state = grain_train(tmp_path / "four", grain_input("global"), 8)
    assert max_rel_diff(whole[0], [np.asarray(x) for x in _leaves(state)]) < 1e-6


def _leaves(state):
    return jax.tree_util.tree_leaves(eqx.filter(state.model, eqx.is_array))


@pytest.mark.slow
def test_a_pipeline_sharded_by_process_refuses_another_process_count(runs):
    _, _, at4 = runs["process"]
    # On one process, the loader sharded by process yields whole global batches.
    with pytest.raises(ValueError, match="states of 2 processes, but this run has 1"):
        grain_train(at4, grain_input("process"), 8)

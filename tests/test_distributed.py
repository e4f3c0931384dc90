"""Multi-process training on one machine: 2 processes x 2 CPU devices over loopback."""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import max_rel_diff
from mp_common import train

import eqx_steps as es


HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(coordinator, n, i, outdir, timeout_s=30):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [
            sys.executable,
            os.path.join(HERE, "mp_worker.py"),
            coordinator,
            str(n),
            str(i),
            str(outdir),
            str(timeout_s),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


def finish(procs, limit_s):
    deadline = time.monotonic() + limit_s
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    return outputs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("mp")
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [launch(coordinator, 2, i, outdir) for i in range(2)]
    outputs = finish(procs, limit_s=100)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    return outdir, outputs


@pytest.mark.slow
def test_processes_hold_identical_states_equal_to_one_process(
    two_process_run, tmp_path
):
    outdir, outputs = two_process_run
    assert "process 0/2: 4 devices" in outputs[0] and "process 1/2" in outputs[1]
    a = np.load(outdir / "state-0.npz")
    b = np.load(outdir / "state-1.npz")
    assert len(a.files) > 0
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    state, _ = train(tmp_path / "single")
    single = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.model)]
    assert max_rel_diff(single, [a[k] for k in a.files]) < 1e-6


@pytest.mark.slow
def test_multi_process_checkpoint_restores_in_one_process(two_process_run):
    outdir, _ = two_process_run
    state, _ = train(outdir / "unused")  # a template of the same structure
    restored = es.checkpoint_restore(state, outdir / "ckpt")
    assert int(restored.step) == int(state.step)
    a = np.load(outdir / "state-0.npz")
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(restored.model)]
    for leaf, k in zip(leaves, a.files):
        np.testing.assert_array_equal(leaf, a[k])


@pytest.mark.slow
def test_a_missing_peer_ends_the_process_within_the_timeout(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    (p,) = [launch(coordinator, 2, 0, tmp_path, timeout_s=5)]
    (out,) = finish([p], limit_s=60)
    elapsed = time.monotonic() - start
    assert p.returncode != 0
    assert elapsed < 45, elapsed
    assert coordinator in out and "2 processes" in out, out


def test_initialize_after_jax_started_is_refused():
    jax.devices()
    with pytest.raises(RuntimeError, match="before JAX starts"):
        es.distributed.initialize("127.0.0.1:1234", 2, 0)


def test_pmap_backend_is_refused_across_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="backend='sharded'"):
        es.parallel_train_step(None, es.mse_loss, es.compute_metrics, backend="pmap")

"""A peer killed mid-run (SIGKILL) in a 2-process job: the survivor ends within
its heartbeat timeout with JAX's line naming the lost process, and the last
checkpoint restores."""

import random
import signal
import time

import pytest
from preempt_common import make_trainer
from test_preemption import launch_pair, tmp_folders

import eqx_steps as es


HEARTBEAT_S = 5  # tests/preempt_worker.py's heartbeat_timeout_s


@pytest.mark.slow
def test_a_killed_peer_ends_the_survivor_and_the_last_checkpoint_restores(tmp_path):
    kill_at = random.Random(1).randint(13, 22)  # after the checkpoint of step 12
    p0, p1 = launch_pair(tmp_path)
    for line in p0.stdout:
        if line.decode().strip() == f"step {kill_at}":
            break
    p1.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out, err = p0.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    p1.wait()
    text = out.decode() + err.decode()
    assert p0.returncode != 0 and p1.returncode == -signal.SIGKILL
    assert elapsed < 6 * HEARTBEAT_S, elapsed
    assert "Task 1 heartbeat timeout" in text or "process 1" in text, text[-3000:]
    latest = es.latest_step(tmp_path)
    assert latest is not None and 12 <= latest <= kill_at
    trainer = make_trainer(tmp_path)  # removes what the dead save left
    assert int(trainer.state.step) == latest and not tmp_folders(tmp_path)

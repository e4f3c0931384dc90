"""A training run to interrupt, for tests/test_preemption.py and test_peer_failure.py.

    python tests/preempt_worker.py WORKDIR [NUM_PROCESSES PROCESS_ID COORDINATOR]

Trains a small DnCNN for 24 steps with checkpoints in WORKDIR, on 4 CPU devices
(one process) or 2 per process (a multi-process job), printing `step N` after
each step and pausing a little so that a signal lands mid-run. It writes the
final model's arrays to WORKDIR/final-PROCESS_ID.npz and exits 0, or on
`TrainingInterrupted` prints what it says and exits with its `exit_status`.
"""

import os
import sys
import time


workdir = sys.argv[1]
n, pid, coordinator = (
    (int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    if len(sys.argv) > 2
    else (1, 0, None)
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if n > 1:
    from eqx_steps import distributed

    distributed.initialize(
        coordinator, n, pid, timeout_s=30, heartbeat_timeout_s=5, local_device_count=2
    )
else:
    from eqx_steps.platform import configure_xla_flags

    configure_xla_flags(4)

import numpy as np  # noqa: E402
from preempt_common import host_leaves, make_trainer  # noqa: E402

import eqx_steps as es  # noqa: E402


t = make_trainer(workdir)
t.add_hook(lambda info: (print(f"step {info.step}", flush=True), time.sleep(0.1)))
try:
    state, _ = t.train()
except es.TrainingInterrupted as e:
    print(f"interrupted {e.signal.name} step {e.step} checkpoint {e.checkpoint}")
    if e.step is None:  # a second signal: a save's threads may still run
        sys.stdout.flush()
        os._exit(e.exit_status)
    sys.exit(e.exit_status)
np.savez(os.path.join(workdir, f"final-{pid}.npz"), *host_leaves(state.model))
print(f"done step {host_leaves(state.step)[0]}", flush=True)

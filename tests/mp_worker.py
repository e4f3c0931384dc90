"""One process of a multi-process training job, for tests/test_distributed.py.

    python tests/mp_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUTDIR [TIMEOUT_S]

Joins the job with 2 CPU devices, trains a small model with the sharded backend
through BasicTrainer (data sliced per process, checkpoints in OUTDIR/ckpt), and
writes its final state's arrays to OUTDIR/state-PROCESS_ID.npz.
"""

import os
import sys


coordinator, num_processes, process_id, outdir = sys.argv[1:5]
timeout_s = int(sys.argv[5]) if len(sys.argv) > 5 else 30
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from eqx_steps import distributed  # noqa: E402


distributed.initialize(
    coordinator,
    int(num_processes),
    int(process_id),
    timeout_s=timeout_s,
    heartbeat_timeout_s=10,
    local_device_count=2,
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from mp_common import train  # noqa: E402


state, history = train(os.path.join(outdir, "ckpt"))
leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.model)]
np.savez(os.path.join(outdir, f"state-{process_id}.npz"), *leaves)
print(
    f"process {jax.process_index()}/{jax.process_count()}: "
    f"{jax.device_count()} devices, step {int(state.step)}, "
    f"eval_loss {history.records[-1]['eval_loss']:.6f}",
    flush=True,
)

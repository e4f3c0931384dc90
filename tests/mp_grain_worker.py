"""One process of a multi-process training job on a Grain input, for
tests/test_pipeline_distributed.py.

    python tests/mp_grain_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID MODE \
        LOCAL_DEVICES OUTDIR:NUM_STEPS [OUTDIR:NUM_STEPS ...]

MODE `global`: every process reads the same MapDataset of global batches (the
trainer keeps each process's rows). MODE `process`: a DataLoader sharded by
process (`ShardByJaxProcess`) yields each process's share. For each
OUTDIR:NUM_STEPS in turn (one launch of the job serves several runs), trains a
tiny MLP to NUM_STEPS with checkpoints every 2 steps in OUTDIR/ckpt (resuming
from there), and writes the final model's arrays to OUTDIR/state-PROCESS_ID.npz.
"""

import os
import sys


coordinator, num_processes, process_id, mode = sys.argv[1:5]
local_devices = int(sys.argv[5])
jobs = [(d, int(n)) for d, n in (a.rsplit(":", 1) for a in sys.argv[6:])]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from eqx_steps import distributed  # noqa: E402


distributed.initialize(
    coordinator,
    int(num_processes),
    int(process_id),
    timeout_s=60,
    heartbeat_timeout_s=20,
    local_device_count=local_devices,
)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from mp_common import grain_input, grain_train  # noqa: E402


for outdir, num_steps in jobs:
    state = grain_train(os.path.join(outdir, "ckpt"), grain_input(mode), num_steps)
    arrays = eqx.filter(state.model, eqx.is_array)
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(arrays)]
    np.savez(os.path.join(outdir, f"state-{process_id}.npz"), *leaves)
    print(
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.device_count()} devices, step {int(state.step)}",
        flush=True,
    )

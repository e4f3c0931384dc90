"""Save a checkpoint, then another under a tiny file-size limit (a full disk),
for tests/test_run_folder_faults.py.

    python tests/fsize_worker.py WORKDIR

Prints the error of the second save on one line: `error TYPE: MESSAGE`.
"""

import os
import resource
import signal
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_steps as es


workdir = sys.argv[1]
model = eqx.nn.Linear(512, 512, key=jax.random.key(0))  # ~1 MB of weights
state = es.TrainState.create(model, optax.sgd(0.1))
es.checkpoint_save(state, {"run": 1}, workdir)
# Past the limit a write fails with EFBIG (instead of SIGXFSZ killing the process).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
state = state.replace(step=jnp.asarray(1))
try:
    es.checkpoint_save(state, {"run": 1}, workdir)
except OSError as e:  # the documented error of a failed save
    print(f"error {type(e).__name__}: {e}", flush=True)
    print("leftovers", sorted(os.listdir(workdir)), flush=True)
    sys.exit(0)
print("saved", flush=True)

"""Data-parallel execution of the per-device steps on every device.

`parallel_train_step` and `parallel_eval_step` take and return an ordinary,
unreplicated-looking `TrainState`: its arrays are global arrays replicated on every
device, so nothing is copied between calls and the user never calls
`replicate`/`unreplicate`. Batches carry a leading device axis
(`(n_devices, per_device, ...)`, see `shard`).

The pieces, one concern per module:

- `_strategies`: the backends, one small object each: `"pmap"` maps the
  per-device step with `jax.pmap`, `"sharded"` with `jax.shard_map` over
  every process's devices;
- `_step`: the callable the builders return (boundary checks, the hot path of a
  call, `.lower`);
- `_flat`: the state split into arrays and static rest, and the compile cache;
- `_mesh`: the device mesh and the placement of states and batches;
- `_scan`: `steps_per_call` (the scan and its auto-unroll);
- `_nonfinite`: the non-finite policy, a transformation of the per-device step;
- `_throttle`: the bound on calls in flight (an XLA:CPU workaround);
- `_replicate`: SCICO-style helpers for users' own pmaps;
- `_api`: the builders.
"""

from ._api import (
    parallel_eval_step as parallel_eval_step,
    parallel_train_step as parallel_train_step,
)
from ._mesh import device_mesh as device_mesh
from ._nonfinite import NonFiniteStepError as NonFiniteStepError
from ._replicate import (
    replicate as replicate,
    shard as shard,
    sync_model_state as sync_model_state,
    unreplicate as unreplicate,
)

# Kept for tests/test_steps.py, which imports it from here; not public.

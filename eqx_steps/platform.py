"""XLA set-up that must happen before JAX starts its backends.

XLA reads `XLA_FLAGS` once, when its backend starts (the first `jax.devices()`,
array or model), not when `jax` is imported. The tests, the benchmarks and the
`eqx-steps` command all set the flags through
[`eqx_steps.platform.configure_xla_flags`][], before anything touches a device:

```python
from eqx_steps.platform import configure_xla_flags

configure_xla_flags(4)  # 4 CPU devices, and the faster XLA:CPU convolutions
import jax
```

Nothing here imports the command line interface or starts JAX.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import PackageNotFoundError, version

from ._validate import check_int


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# jaxlib from which XLA:CPU knows the ynn flag (and runs convolutions ~3x faster
# with it off); older jaxlibs abort on the unknown flag.
_YNN_SINCE = (0, 10)


def jaxlib_version() -> tuple[int, ...]:
    """The installed jaxlib version as integers, e.g. `(0, 10, 2)`; `()` if absent."""
    try:
        text = version("jaxlib")
    except PackageNotFoundError:
        return ()
    return tuple(int(v) for v in re.findall(r"\d+", text)[:3])


def default_cpu_devices() -> int:
    """The number of CPU devices the command uses when `--devices` is not given.

    `min(4, os.cpu_count())`: enough devices that the data-parallel path (batch
    split across devices, gradients averaged) is what runs, without splitting a
    small machine into more devices than it has cores.

    **Returns:**

    An int >= 1.
    """
    return max(1, min(4, os.cpu_count() or 1))


def requested_cpu_devices() -> int | None:
    """The CPU device count already in `XLA_FLAGS`, or `None` when it sets none.

    **Returns:**

    The value of the last `--xla_force_host_platform_device_count=N` in
    `XLA_FLAGS`, or `None`.
    """
    found = re.findall(
        re.escape(_DEVICE_COUNT_FLAG) + r"=(\d+)", os.environ.get("XLA_FLAGS", "")
    )
    return int(found[-1]) if found else None


def configure_xla_flags(devices: int | None = None) -> str:
    """Set `XLA_FLAGS` for a run on `devices` CPU devices; call before JAX starts.

    It

    - sets `--xla_force_host_platform_device_count=devices` (replacing any count
        already there) when `devices` is given: the host CPU becomes `devices`
        XLA devices. It only concerns the CPU platform; a GPU or TPU run uses its
        accelerators whatever the value.
    - adds `--xla_cpu_experimental_ynn_fusion_type=` (empty: the experimental
        fusion off) when the user has not set `XLA_FLAGS` at all and jaxlib is
        0.10 or newer: XLA:CPU of jaxlib 0.10 runs DnCNN-style convolutions about
        3x faster without it. Older jaxlibs abort on this unknown flag, so it is
        never added there, and a user's own `XLA_FLAGS` is kept as it is.

    **Arguments:**

    - `devices`: the number of CPU devices, or `None` to leave the count alone.

    **Returns:**

    The new value of `XLA_FLAGS` (also set in `os.environ`).

    **Raises:**

    `TypeError` if `devices` is not an int, `ValueError` if it is below 1.
    """
    user = os.environ.get("XLA_FLAGS")
    flags = (user or "").split()
    if devices is not None:
        devices = check_int("devices", devices, minimum=1)
        flags = [f for f in flags if not f.startswith(_DEVICE_COUNT_FLAG + "=")]
        flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
    if user is None and jaxlib_version() >= _YNN_SINCE:
        flags.append(_YNN_FLAG)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return os.environ["XLA_FLAGS"]


def backends_started() -> bool:
    """Whether JAX has started its backends (after which `XLA_FLAGS` is fixed).

    **Returns:**

    `True` once anything has touched a device in this process.
    """
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()

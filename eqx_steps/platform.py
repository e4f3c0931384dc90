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

The library's own compiled programs (the parallel steps, evaluation,
`only_apply`, `denoise_image`) do not need the flag: they compile with
[`eqx_steps.platform.compiler_options`][], which sets the same XLA:CPU fusion
(reductions only) for that compilation alone (`jax.jit(...,
compiler_options=...)`), whatever `XLA_FLAGS` says and whenever JAX was
imported. The flag remains for a user's own `jax.jit` code.

Nothing here imports the command line interface or starts JAX.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ._validate import check_int


_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU's experimental YNNPACK fusion for reductions only: its default also
# takes the convolutions, ~3x slower than XLA's own; with none at all, a
# batch-norm reduction over an (N, H, W, C) activation goes through XLA's slow
# `reduce-window` rewrite (~15x the time YNNPACK takes).
_YNN_VALUE = "LIBRARY_FUSION_TYPE_REDUCE"
_YNN_FLAG = f"--{_YNN_OPTION}={_YNN_VALUE}"
# jaxlib from which XLA:CPU knows the ynn flag and this value; older jaxlibs
# abort on the unknown flag.
_YNN_SINCE = (0, 10)


@functools.cache
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
    - adds `--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`
        (the experimental YNNPACK fusion for reductions only) when the user has
        not set `XLA_FLAGS` at all and jaxlib is 0.10 or newer: XLA:CPU of
        jaxlib 0.10 runs DnCNN-style convolutions about 3x faster without the
        fusion's default (which also takes the convolutions), and batch-norm
        reductions about 15x faster with YNNPACK than with none. Older jaxlibs
        abort on this unknown flag, so it is never added there, and a user's
        own `XLA_FLAGS` is kept as it is.

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


def compiler_options(
    platform: str, options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The XLA options the library compiles its programs with on `platform`.

    On `"cpu"` with jaxlib 0.10 or newer: `options` plus
    `xla_cpu_experimental_ynn_fusion_type = "LIBRARY_FUSION_TYPE_REDUCE"`
    (XLA:CPU's experimental YNNPACK fusion for reductions only, for this
    compilation only): DnCNN-style convolutions run about 3.5x faster than with
    the fusion's default, and batch-norm reductions about 15x faster than with
    no fusion (docs/performance.md). It is left out when `options` already
    name it, or when `XLA_FLAGS` sets it (the user's choice, either way). Other
    platforms get `options` as they are: nothing is added on a GPU or TPU.

    **Arguments:**

    - `platform`: the devices' platform (`device.platform`: `"cpu"`, `"gpu"`, ...).
    - `options`: the caller's own compiler options, or `None`.

    **Returns:**

    A new dict for `jax.jit(..., compiler_options=...)`, or `None` when there
    is nothing to pass.
    """
    merged = dict(options or {})
    if (
        platform == "cpu"
        and _YNN_OPTION not in merged
        and _YNN_OPTION not in os.environ.get("XLA_FLAGS", "")
        and jaxlib_version() >= _YNN_SINCE
    ):
        merged[_YNN_OPTION] = _YNN_VALUE
    return merged or None


def default_backend_jit(fun: Callable) -> Callable:
    """`eqx.filter_jit(fun)`, compiled with
    [`eqx_steps.platform.compiler_options`][] of the default
    backend.

    The backend is read at the first call (JAX has started by then), so that
    defining such a function at import time starts nothing. For functions that
    run on the default backend's devices (`jax.local_devices()[0]`).

    **Arguments:**

    - `fun`: the function, as for `eqx.filter_jit`.

    **Returns:**

    The jitted function (same signature).
    """
    jitted: list[Callable] = []

    def call(*args, **kwargs):
        if not jitted:
            import equinox as eqx
            import jax

            options = compiler_options(jax.default_backend())
            jitted.append(eqx.filter_jit(fun, compiler_options=options))  # pyright: ignore[reportCallIssue]
        return jitted[0](*args, **kwargs)

    call.__name__ = getattr(fun, "__name__", "jitted")
    call.__doc__ = fun.__doc__
    call.__wrapped__ = fun  # pyright: ignore[reportFunctionMemberAccess]
    return call

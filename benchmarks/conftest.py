"""Benchmark configuration: the device count, XLA flags and the CI mode.

`XLA_FLAGS=--xla_force_host_platform_device_count=N` is read once per process,
so the suite runs once per device count: `EQX_STEPS_BENCH_DEVICES` (default 4)
sets N here, before JAX starts, through `eqx_steps.platform.configure_xla_flags`
(the function the tests and the command use): when the user has not set
`XLA_FLAGS` themselves,
`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE` is added too
(XLA:CPU of jaxlib 0.10 runs convolutions ~3x faster without YNNPACK, and
reductions faster with it; older jaxlibs abort on it).

Run with `pytest benchmarks --benchmark-only` (times everything) or
`pytest benchmarks --benchmark-disable` (CI: every case once, small sizes).
"""

import os

from eqx_steps.platform import configure_xla_flags


N_DEVICES = int(os.environ.get("EQX_STEPS_BENCH_DEVICES", "4"))

configure_xla_flags(N_DEVICES)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_report_header(config):
    return (
        f"eqx_steps benchmarks: {jax.device_count()} {jax.default_backend()} "
        f"devices, XLA_FLAGS={os.environ['XLA_FLAGS']!r}"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # pyproject's addopts has --benchmark-skip so that a plain `pytest` stays
    # quick; --benchmark-only overrides it, and so should --benchmark-disable
    # (run every benchmark body once, untimed, as CI does).
    bs = getattr(config, "_benchmarksession", None)
    if bs is not None and bs.disabled:
        bs.skip = False


@pytest.fixture(scope="session", autouse=True)
def _devices():
    if jax.device_count() != N_DEVICES:
        pytest.exit(
            f"expected {N_DEVICES} devices, JAX has {jax.device_count()}: JAX was "
            "imported before benchmarks/conftest.py could set XLA_FLAGS."
        )


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """Whether benchmarks are disabled (run once each): use small sizes."""
    return bool(request.config._benchmarksession.disabled)

"""Test configuration: 4 CPU devices, so that every parallel path runs without a GPU.

The XLA flags must be set before JAX starts its backend, hence at the top of conftest.
"""

import os

from eqx_steps.platform import configure_xla_flags


# XLA reads its flags when the backend starts, not at import: 4 CPU devices, and
# the faster XLA:CPU convolution setting (see docs/performance.md).
configure_xla_flags(4)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The command's compilation cache stays off in the tests' subprocesses (nothing
# written under the user's ~/.cache); tests/test_cli_startup.py turns it on.
os.environ.setdefault("EQX_STEPS_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


settings.register_profile(
    "jax",
    deadline=None,
    max_examples=10,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jax")


@pytest.fixture(scope="session", autouse=True)
def _four_devices():
    assert jax.local_device_count() == 4, "tests expect 4 CPU devices"

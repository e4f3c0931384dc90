"""Test configuration: 4 CPU devices, so that every parallel path runs without a GPU.

The flags must be set before JAX is imported anywhere, hence at the top of conftest.
"""

import os
from importlib.metadata import version


_FLAGS = ["--xla_force_host_platform_device_count=4"]
# XLA:CPU in jaxlib 0.10 runs convolutions ~3x faster with the experimental ynn
# fusion off; older jaxlibs abort on the unknown flag (see docs/performance.md).
if int(version("jaxlib").split(".")[1]) >= 10:
    _FLAGS.append("--xla_cpu_experimental_ynn_fusion_type=")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " " + _flag
        ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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

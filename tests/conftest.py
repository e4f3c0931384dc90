"""Test configuration: 4 CPU devices, so that every parallel path runs without a GPU.

The XLA flags must be set before JAX starts its backend, hence at the top of conftest.
"""

import atexit
import os
import shutil
import tempfile

from eqx_steps.platform import configure_xla_flags


# XLA reads its flags when the backend starts, not at import: 4 CPU devices, and
# the faster XLA:CPU convolution setting (see docs/performance.md).
configure_xla_flags(4)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's own persistent compilation cache, in a folder of this test session only
# (removed at exit), shared by the tests and their subprocesses: the commands
# that the tests run in fresh processes compile the same tiny programs again and
# again, and reading them back is quicker (about a fifth less CPU time for
# tests/test_run_folder_faults.py). Programs quicker to compile than 0.1 s are
# not worth a file.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="eqx_steps_tests_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# The command's own compilation cache, in the tests' subprocesses: that same
# folder (nothing written under the user's ~/.cache; `off` would turn JAX's off
# too). tests/test_cli_startup.py gives it folders of its own.
os.environ.setdefault(
    "EQX_STEPS_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"]
)

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

"""Peak memory of Adam on a ~50M-parameter MLP with `donate=True` and `False`.

Each measurement runs `memory_probe.py` in a fresh process (peak RSS is per
process) with this session's device count; the figures land in
`extra_info` for `report.py`. With `--benchmark-disable` the model has 1M
parameters and only the library runs, so CI stays quick.
"""

import json
import os
import subprocess
import sys

import jax
import pytest
from memory import NO_COMBINER


HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("library", "library-split", "library-zero", "baseline", "baseline-jit")


def probe(impl: str, donate: bool, params: float) -> dict:
    env = dict(os.environ, EQX_STEPS_BENCH_DEVICES=str(jax.device_count()))
    if impl == "library-split":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {NO_COMBINER}"
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "memory_probe.py"),
            "--impl",
            impl,
            "--donate",
            str(int(donate)),
            "--params",
            str(params),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"memory_probe.py failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("donate", [True, False], ids=["donate", "nodonate"])
@pytest.mark.parametrize("impl", IMPLS)
def test_memory(benchmark, impl, donate, quick):
    if quick and impl not in ("library", "library-split", "library-zero"):
        pytest.skip("the baselines run with --benchmark-only")
    params = 1e6 if quick else 50e6
    benchmark.group = "memory"
    benchmark.extra_info.update(role=impl, donate=donate, devices=jax.device_count())
    result = benchmark.pedantic(probe, args=(impl, donate, params), rounds=1)
    benchmark.extra_info.update(result)
    assert result["params"] >= 0.9 * params

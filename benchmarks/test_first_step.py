"""Time to the first step (trace, compile, first call) in a fresh process: the
library's `parallel_train_step` (default `nan_policy="raise"`) beside a plain
`eqx.filter_jit` loop of the same model. See `first_step.py`.

Target: library / plain <= 1.2 for the tiny MLP, DnCNN and UNet, on 1 and 4
devices (`EQX_STEPS_BENCH_DEVICES`), both backends. `--benchmark-disable` (CI)
runs the tiny MLP once per backend at small sizes; DnCNN and UNet are timed with
`--benchmark-only`.
"""

from __future__ import annotations

import first_step
import jax
import pytest


@pytest.mark.parametrize("backend", ["pmap", "sharded"])
@pytest.mark.parametrize("model", ["tiny", "dncnn", "unet"])
def test_first_step(benchmark, model, backend, quick):
    if quick and model != "tiny":
        pytest.skip("compiles for tens of seconds; timed with --benchmark-only")
    repeats = 1 if quick else 3
    results = []
    benchmark.group = "first-step"
    benchmark.pedantic(
        lambda: results.append(
            first_step.compare(model, backend, jax.device_count(), repeats, quick)
        ),
        rounds=1,
    )
    r = results[-1]
    benchmark.extra_info.update(
        workload=f"first-step {model}",
        backend=backend,
        devices=jax.device_count(),
        library_s=r["library_s"],
        plain_s=r["plain_s"],
        ratio=r["ratio"],
        library_cpu_s=r["library_cpu_s"],
        plain_cpu_s=r["plain_cpu_s"],
        cpu_ratio=r["cpu_ratio"],
        load=r["load"],
    )
    assert all(run["first_step_s"] > 0 for run in r["runs"])

"""How the step's cost grows: DnCNN time per step against global batch size and
image size, per backend, beside the hand-written baseline of the same backend.

The device count is the session's (`EQX_STEPS_BENCH_DEVICES`): run this file
once per device count, the whole sweep on 1 and 4 devices and the batch-16 and
batch-64 cases on 2 and 8, e.g.

    EQX_STEPS_BENCH_DEVICES=2 pytest benchmarks/test_scaling.py --benchmark-only \
        -k "batch-16-64 or batch-64-64" --benchmark-json scaling_2.json

and `report.py --from-json ... --scaling-plot PNG` plots the records (group
`scaling`). Each case times the library and the baseline in interleaved
rounds (`extra_info["library_s"]`, `["baseline_s"]`, per step). With
`--benchmark-disable` one small case per backend runs once.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import pytest
import workloads as w


BATCHES = (1, 4, 16, 64)  # global; those not divisible by the devices are skipped
IMAGES = (32, 64, 128, 256)  # at batch 16
CALLS, ROUNDS = 3, 3  # calls per round for batch 16 at 64x64; fewer above


def calls(batch: int, hw: int) -> int:
    """Calls per round: `CALLS` up to the work of batch 16 at 64x64, then fewer
    (one for 4x that work and more), so a 256x256 round takes one step."""
    return max(1, min(CALLS, round(CALLS * 16 * 64 * 64 / (batch * hw * hw))))


def _cases() -> list[tuple[str, int, int]]:
    sweep = [("batch", b, 64) for b in BATCHES] + [("image", 16, hw) for hw in IMAGES]
    return [
        (axis, b, hw) for axis, b, hw in sweep if not (axis == "image" and hw == 64)
    ]


def timer(step, state, batch, n_calls: int = CALLS):
    """`run()`: `n_calls` calls feeding the state back in, seconds per step."""
    holder = [state]
    throttle = w.Throttle()

    def run() -> float:
        s = holder[0]
        t0 = time.perf_counter()
        for _ in range(n_calls):
            s, m = step(s, batch)
            throttle(m)
        jax.block_until_ready((s, m))
        holder[0] = s
        return (time.perf_counter() - t0) / n_calls

    return run


def build(backend: str, sizes: w.Sizes):
    batch = w.batch("dncnn", sizes)
    state = w.library_state("dncnn", sizes)
    n = calls(sizes.batch, sizes.hw)
    library = timer(w.library_step("train", backend), state, batch, n)
    net = w.raw_net("dncnn", *w.library_model("dncnn", sizes))
    raw = w.raw_step(net, "train", backend)
    baseline = timer(raw, w.place_raw_state(w.raw_state(net), backend), batch, n)
    return library, baseline


@pytest.mark.parametrize("backend", ["pmap", "sharded"])
@pytest.mark.parametrize("axis, batch, hw", _cases())
def test_scaling(benchmark, backend, axis, batch, hw, quick):
    n = jax.device_count()
    if batch % n:
        pytest.skip(f"global batch {batch} does not divide over {n} devices")
    if quick and (axis, batch) != ("batch", 16):
        pytest.skip("one case per backend with --benchmark-disable")
    sizes = dataclasses.replace(w.SIZES["dncnn"], batch=batch, hw=hw)
    if quick:
        sizes = dataclasses.replace(w.QUICK_SIZES["dncnn"], batch=batch)
    library, baseline = build(backend, sizes)
    library(), baseline()  # compile
    lib_s, base_s = [], []

    def one_round():
        base_s.append(baseline())
        lib_s.append(library())

    benchmark.group = "scaling"
    benchmark.pedantic(one_round, rounds=1 if quick else ROUNDS)
    benchmark.extra_info.update(
        role="scaling",
        axis=axis,
        backend=backend,
        devices=n,
        batch=batch,
        hw=sizes.hw,
        library_s=lib_s,
        baseline_s=base_s,
        ratio=float(np.median(lib_s) / np.median(base_s)),
    )
    assert all(t > 0 for t in lib_s + base_s)

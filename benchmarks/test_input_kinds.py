"""The tiny-MLP step fed JAX arrays, NumPy arrays and pre-sharded arrays, beside
the plain jitted step (issue 19: JAX-array batches placed with one compiled call,
as NumPy batches are; target: JAX arrays within 1.2x of the plain step).

Each library case is one call `step(state, es.shard(batch))` per step, the batch
being the same global batch `(32, 16)` each time, held as:

- `jax`: JAX arrays on the default device (what many Equinox loaders yield);
- `numpy`: NumPy arrays on the host;
- `presharded`: the result of `es.shard` computed once, already on the devices
    (the step keeps it as it is): the cost of the step alone.

The baseline is the hand-written single-device `jax.jit` step of
`workloads.py` (the same math) fed a batch already on its device, timed in
rounds interleaved with each case's (`extra_info["partner_times"]`), so both see
the same load; the ratios (medians) come from those pairs, and each kind's
median is also compared with the pre-sharded one (the placement's own cost).
`EQX_STEPS_BENCH_DEVICES=1` compares like with like (one device each); on
several CPU devices sharing few cores, the library's step runs every device's
share, which the single-device baseline does not:

    pytest benchmarks/test_input_kinds.py --benchmark-only
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import workloads as w

import eqx_steps as es


KINDS = ("jax", "numpy", "presharded")
CALLS, ROUNDS, WARMUP = 200, 15, 2
_MEDIANS: dict[str, float] = {}  # per kind, for the ratios to "presharded"


def _global_batch(sizes: w.Sizes):
    rng = np.random.default_rng(1)
    f = sizes.features
    x = rng.normal(size=(sizes.batch, f[0])).astype(np.float32)
    y = rng.normal(size=(sizes.batch, f[-1])).astype(np.float32)
    return {"image": x, "label": y}


def _library(kind: str, quick: bool):
    sizes = (w.QUICK_SIZES if quick else w.SIZES)["tiny"]
    host = _global_batch(sizes)
    if kind == "numpy":
        batch = host
    else:
        batch = jax.tree_util.tree_map(jnp.asarray, host)
    presharded = es.shard(batch) if kind == "presharded" else None
    state = w.library_state("tiny", sizes)
    step = w.library_step("train", "pmap")
    holder = [state]

    def run(n):
        s = holder[0]
        for _ in range(n):
            b = presharded if presharded is not None else es.shard(batch)
            s, m = step(s, b)
        holder[0] = s
        jax.block_until_ready((s, m))

    return run


def _plain(quick: bool):
    sizes = (w.QUICK_SIZES if quick else w.SIZES)["tiny"]
    net = w.raw_net("tiny", *w.library_model("tiny", sizes))
    holder = [w.place_raw_state(w.raw_state(net), "jit")]
    step = w.raw_step(net, "train", "jit", donate=True, steps_per_call=1, unroll=True)
    dev = jax.devices()[0]
    batch = jax.device_put(_global_batch(sizes), dev)
    throttle = w.Throttle()

    def run(n):
        a = holder[0]
        for _ in range(n):
            a, m = step(a, batch)
            throttle(m)
        holder[0] = a
        jax.block_until_ready((a, m))

    return run


@pytest.mark.parametrize("kind", KINDS)
def test_input_kind(benchmark, kind: str, quick: bool):
    run = _library(kind, quick)
    run(1)  # trace and compile
    calls, rounds, warmup = (2, 1, 0) if quick else (CALLS, ROUNDS, WARMUP)
    benchmark.group = "tiny-input-kinds"
    benchmark.extra_info.update(
        kind=kind,
        devices=jax.device_count(),
        steps_per_round=calls,
        load_avg=os.getloadavg()[0],
        partner="raw-jit (single device, batch on the device)",
    )
    setup = None
    if not quick:
        import time

        plain = _plain(quick)
        plain(1)
        times: list[float] = []

        def setup():
            t0 = time.perf_counter()
            plain(calls)
            times.append(time.perf_counter() - t0)

        benchmark.extra_info["partner_times"] = times
    benchmark.pedantic(
        run, args=(calls,), setup=setup, rounds=rounds, warmup_rounds=warmup
    )
    if not quick and benchmark.stats is not None:
        mine = sorted(benchmark.stats.stats.data)
        base = sorted(benchmark.extra_info["partner_times"][warmup:])
        ratio = float(np.median(mine) / np.median(base))
        benchmark.extra_info["ratio_to_plain_jit"] = ratio
        _MEDIANS[kind] = float(np.median(mine))
        print(
            f"\n{kind}: {ratio:.2f}x the plain jitted step "
            f"(load {os.getloadavg()[0]:.1f})"
        )
        if kind == KINDS[-1] and set(_MEDIANS) == set(KINDS):
            for other in KINDS[:-1]:
                print(f"{other}: {_MEDIANS[other] / _MEDIANS[kind]:.2f}x presharded")

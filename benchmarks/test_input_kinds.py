"""The tiny-MLP step fed JAX arrays, NumPy arrays and pre-sharded arrays, beside
plain jitted steps (issue 19: JAX-array batches placed with one compiled call,
as NumPy batches are; target: JAX arrays within 1.2x of the plain step).

Each library case is one call `step(state, es.shard(batch))` per step, the batch
being the same global batch `(32, 16)` each time (8 in turn for `jax-fresh`),
held as:

- `jax`: JAX arrays on the default device (what many Equinox loaders yield);
- `jax-fresh`: new JAX arrays every step (`jnp.asarray` of one of 8 host
    batches in turn), as a loader yields them, fed the same way to the plain
    Equinox step, so that the step may not wait for their transfer;
- `numpy`: NumPy arrays on the host;
- `presharded`: the result of `es.shard` computed once, already on the devices
    (the step keeps it as it is): the cost of the step alone.

Two plain steps (the same math, one device, the whole global batch) are timed in
rounds interleaved with each case's, so that all see the same load:

- `raw-jit` (`extra_info["partner_times"]`): `jax.jit` on a flat tuple of the
    parameters' and Adam's arrays, fed a batch already on its device: the floor,
    with no PyTree to rebuild after a call;
- `equinox-jit` (`extra_info["equinox_times"]`): what a plain Equinox loop
    writes, `jax.jit` on the model's arrays (`eqx.partition`) and optax's
    state, fed the same JAX arrays (new ones every step for `jax-fresh`),
    returning the updated model and optimizer state (which JAX rebuilds after
    every call, as the library rebuilds its `TrainState`).

The ratios (medians) come from those pairs, and each kind's median is also
compared with the pre-sharded one (the placement's own cost).
`EQX_STEPS_BENCH_DEVICES=1` compares like with like (one device each); on
several CPU devices sharing few cores, the library's step runs every device's
share, which the single-device baselines do not:

    EQX_STEPS_BENCH_DEVICES=1 pytest benchmarks/test_input_kinds.py --benchmark-only -s
"""

from __future__ import annotations

import functools
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import workloads as w

import eqx_steps as es


KINDS = ("jax", "jax-fresh", "numpy", "presharded")  # "presharded" last
FRESH = 8  # host batches that `jax-fresh` turns into JAX arrays in turn
CALLS, ROUNDS, WARMUP = 200, 15, 2
_MEDIANS: dict[str, float] = {}  # per kind, for the ratios to "presharded"


def _global_batch(sizes: w.Sizes, seed: int = 1):
    rng = np.random.default_rng(seed)
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
    if kind == "presharded":
        presharded = es.shard(batch)
        sharded = lambda i: presharded  # noqa: E731
    elif kind == "jax-fresh":
        fresh = _fresh_batches(sizes)
        sharded = lambda i: es.shard(fresh(i))  # noqa: E731
    else:
        sharded = lambda i: es.shard(batch)  # noqa: E731
    state = w.library_state("tiny", sizes)
    step = w.library_step("train", "pmap")
    holder = [state]

    def run(n):
        s = holder[0]
        for i in range(n):
            s, m = step(s, sharded(i))
        holder[0] = s
        jax.block_until_ready((s, m))

    return run


def _fresh_batches(sizes: w.Sizes):
    """Step `i`'s batch: new JAX arrays from host batch `i % FRESH`."""
    hosts = [_global_batch(sizes, seed) for seed in range(1, FRESH + 1)]
    return lambda i: jax.tree_util.tree_map(jnp.asarray, hosts[i % FRESH])


def _plain(quick: bool):
    sizes = (w.QUICK_SIZES if quick else w.SIZES)["tiny"]
    net = w.raw_net("tiny", *w.library_model("tiny", sizes))
    holder = [w.place_raw_state(w.raw_state(net), "jit")]
    step = w.raw_step(net, "train", "jit", donate=True, steps_per_call=1, unroll=True)
    dev = jax.devices()[0]
    batch = jax.device_put(_global_batch(sizes), dev)
    throttle = w.Throttle(1)

    def run(n):
        a = holder[0]
        for _ in range(n):
            a, m = step(a, batch)
            throttle(m)
        holder[0] = a
        jax.block_until_ready((a, m))

    return run


def _equinox(quick: bool, fresh: bool = False):
    """A plain Equinox loop's jitted step: `jax.jit` on the model's arrays and
    optax's state, the rest of the model closed over, the batch as JAX arrays
    (new ones every step with `fresh`)."""
    sizes = (w.QUICK_SIZES if quick else w.SIZES)["tiny"]
    model, _ = w.library_model("tiny", sizes)
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = w.TX.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        y = batch["label"]

        def loss_fn(params):
            out = jax.vmap(eqx.combine(params, static))(batch["image"])
            return jnp.mean(0.5 * (out - y) ** 2), out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = w.TX.update(grads, opt_state, params)
        metrics = {"loss": loss, "snr": es.snr(y, out)}
        return optax.apply_updates(params, updates), opt_state, metrics

    batch = jax.tree_util.tree_map(jnp.asarray, _global_batch(sizes))
    batches = _fresh_batches(sizes) if fresh else lambda i: batch
    holder = [(params, opt_state)]
    throttle = w.Throttle(1)

    def run(n):
        p, o = holder[0]
        for i in range(n):
            p, o, metrics = step(p, o, batches(i))
            throttle(metrics)
        holder[0] = (p, o)
        jax.block_until_ready((p, o))

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
        partner2="equinox-jit (single device, JAX-array batch"
        + (", new every step)" if kind == "jax-fresh" else ")"),
    )
    setup = None
    if not quick:
        import time

        plain, equinox = _plain(quick), _equinox(quick, fresh=kind == "jax-fresh")
        plain(1)
        equinox(1)
        times: list[float] = []
        eqx_times: list[float] = []

        def setup():
            for fn, into in ((plain, times), (equinox, eqx_times)):
                t0 = time.perf_counter()
                fn(calls)
                into.append(time.perf_counter() - t0)

        benchmark.extra_info["partner_times"] = times
        benchmark.extra_info["equinox_times"] = eqx_times
    benchmark.pedantic(
        run, args=(calls,), setup=setup, rounds=rounds, warmup_rounds=warmup
    )
    if not quick and benchmark.stats is not None:
        mine = sorted(benchmark.stats.stats.data)
        base = sorted(benchmark.extra_info["partner_times"][warmup:])
        ratio = float(np.median(mine) / np.median(base))
        eqx_base = sorted(benchmark.extra_info["equinox_times"][warmup:])
        eqx_ratio = float(np.median(mine) / np.median(eqx_base))
        benchmark.extra_info["ratio_to_plain_jit"] = ratio
        benchmark.extra_info["ratio_to_equinox_jit"] = eqx_ratio
        _MEDIANS[kind] = float(np.median(mine))
        print(
            f"\n{kind}: {ratio:.2f}x the raw jitted step, {eqx_ratio:.2f}x the "
            f"plain Equinox jitted step (load {os.getloadavg()[0]:.1f})"
        )
        if kind == KINDS[-1] and set(_MEDIANS) == set(KINDS):
            for other in KINDS[:-1]:
                print(f"{other}: {_MEDIANS[other] / _MEDIANS[kind]:.2f}x presharded")

"""Peak memory of a few Adam steps on a large MLP, in a fresh process.

    python benchmarks/memory_probe.py --impl library --donate 1 --params 50e6

prints one JSON line: the RSS after importing JAX (`base_mb`), after building
the state (`state_mb`), and the peak over the whole run (`peak_mb`), all from
the kernel's own accounting of this process (`VmRSS`/`VmHWM`; XLA:CPU has no
`memory_stats`). The device count comes from `EQX_STEPS_BENCH_DEVICES`, as for
the suite. The library runs `backend="pmap"`; `--impl baseline` runs the same
steps as raw `jax.pmap` over a flat tuple of arrays, with or without
`donate_argnums`, and `--impl baseline-jit` as raw `jax.jit` on one device with
no collective (the floor: no buffers for the gradient all-reduce).
`--impl library-split` is the library with XLA's CPU all-reduce combiner turned
off (`XLA_FLAGS=... --xla_disable_hlo_passes=cpu-all-reduce-combiner`, which the
caller sets): one all-reduce per gradient leaf instead of one for all of them.
`--impl library-sharded` runs `backend="sharded"`, and `--impl library-zero` the
same with `shard_optimizer_state=True` (each device keeps 1/N of Adam's moments,
the gradients are reduce-scattered); `--impl library-zero-split` is that with the
all-reduce combiner off (the same `XLA_FLAGS` as `library-split`).
The width is a multiple of 8, so that the large layers divide by the device count.
`step_s` is the median wall time of one of the measured steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402, F401  (sets XLA_FLAGS before JAX is imported)
from memory import NO_COMBINER  # noqa: E402


def _analyse(fn, *args) -> dict:
    """XLA's memory analysis of the compiled `fn(*args)`, per device, in MB:
    arguments + outputs - aliased (donated) + temporaries."""
    try:
        ma = fn.lower(*args).compile().memory_analysis()
        mb = {
            k: getattr(ma, f"{k}_size_in_bytes") / 2**20
            for k in ("argument", "output", "alias", "temp")
        }
    except Exception as e:  # noqa: BLE001 - an optional figure
        return {"xla_error": repr(e)}
    mb["peak"] = mb["argument"] + mb["output"] - mb["alias"] + mb["temp"]
    return {f"xla_{k}_mb": v for k, v in mb.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--impl",
        choices=(
            "library",
            "library-split",
            "library-sharded",
            "library-zero",
            "library-zero-split",
            "baseline",
            "baseline-jit",
        ),
        default="library",
    )
    p.add_argument("--donate", type=int, choices=(0, 1), default=1)
    p.add_argument("--params", type=float, default=50e6, help="about this many")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.impl.endswith("-split") and NO_COMBINER not in os.environ["XLA_FLAGS"]:
        p.error(f"--impl {args.impl} needs XLA_FLAGS={NO_COMBINER}")

    import time

    import equinox as eqx
    import jax
    import numpy as np
    import workloads as w
    from memory import PeakRSS, rss_mb, trim

    import eqx_steps as es

    # MLP 64 -> width x (depth - 1) -> 64: about depth * width^2 parameters.
    depth = 4
    width = max(8, 8 * int(round((args.params / (depth - 1)) ** 0.5 / 8)))
    n = jax.device_count()
    batch = w.batch("tiny", w.Sizes(batch=8 * n, features=(64, width, 64)))
    trim()
    base_mb = rss_mb()
    peak = PeakRSS()

    model = eqx.nn.MLP(64, 64, width, depth, key=jax.random.key(0))
    n_params = sum(
        x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    )
    # `state` is rebound at every call, so no older state stays alive.
    if args.impl.startswith("library"):
        state = es.TrainState.create(model, w.TX)
        del model
        zero = args.impl.startswith("library-zero")
        step = w.library_step(
            "train",
            "sharded" if zero or args.impl == "library-sharded" else "pmap",
            donate=bool(args.donate),
            shard_optimizer_state=zero,
        )
        analyse = _analyse  # step.lower(state, batch): the public view
        jax.block_until_ready(state)
        state_mb = rss_mb()
    else:
        net = w.raw_net("tiny", model)
        del model
        state = w.raw_state(net)
        # keep only the shapes in `net`, so that it holds no second copy
        net.params = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in net.params)
        backend = "jit" if args.impl == "baseline-jit" else "pmap"
        step = w.raw_step(net, "train", backend, donate=bool(args.donate))
        analyse = _analyse
        if backend == "jit":
            batch = w.single_device_batch(batch)
        jax.block_until_ready(state)
        state_mb = rss_mb()
        state = w.place_raw_state(state, backend)  # as the library's first call
    state, metrics = step(state, batch)  # the library's first call copies the state
    jax.block_until_ready((state, metrics))
    first_peak_mb, start_mb = peak.reset()
    xla = analyse(step, state, batch)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "impl": args.impl,
                "donate": bool(args.donate),
                "devices": n,
                "params": int(n_params),
                "steps": args.steps,
                "base_mb": base_mb,
                "state_mb": state_mb,
                # the first call (trace, compile, copy the state onto the devices)
                "first_call_peak_mb": first_peak_mb,
                # the following steps: what donation is for
                "steps_start_mb": start_mb,
                "steps_peak_mb": peak.max_mb(),
                "loss": float(np.asarray(metrics["loss"])),
                "step_s": float(np.median(times)),
                # XLA's own accounting of the compiled step, per device
                **xla,
            }
        )
    )


if __name__ == "__main__":
    main()

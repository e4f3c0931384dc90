"""Time to the first step, in a fresh process: the library against a plain loop.

A user's script pays, before its first step, the trace and compilation of the
step. This measures that time (from a built model, optimizer state and batch on
the host to the first step's result on the host: trace, compile, the first
call) in a fresh process per case, for

- `library`: `eqx_steps.parallel_train_step` with its defaults
    (`nan_policy="raise"`, `backend` as given) on every local device;
- `plain`: the loop a user writes without the library: one `eqx.filter_jit`
    function of the model, the model state and the optimizer state (loss,
    `eqx.filter_value_and_grad`, optax's Adam, the new batch-norm statistics,
    and the metrics the library's step reports: loss and SNR) on the whole
    batch, on the default device.

Models (global batch, Adam): `tiny` (MLP 16-32-32-4, batch 32), `dncnn` (depth
6, 32 filters, 64x64x1, batch 16), `unet` (SCICO's UNet, depth 2, 16 filters,
64x64x1, batch 16). The quick sizes (`--quick`) keep the CI run short.

    python benchmarks/first_step.py --model dncnn --impl library --devices 4
    python benchmarks/first_step.py --compare --models tiny,dncnn,unet --devices 1,4

The machine is often shared: each run also reports the process's CPU time over
the same interval (`cpu_s`, all its threads), which other processes disturb far
less than the wall time.

Prints one JSON line per run (`first_step_s`, `cpu_s`; for the library also the split
into `trace_s` (tracing and lowering, from `step.lower`) and `compile_s`, from a
second, separate measurement in the same process) and, with `--compare`, the
ratios library / plain, the two alternating, medians over `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


SIZES = {
    "tiny": {"batch": 32},
    "dncnn": {"batch": 16, "depth": 6, "filters": 32, "hw": 64},
    "unet": {"batch": 16, "depth": 2, "filters": 16, "hw": 64},
}
QUICK_SIZES = {
    "tiny": {"batch": 8},
    "dncnn": {"batch": 4, "depth": 2, "filters": 4, "hw": 8},
    "unet": {"batch": 4, "depth": 2, "filters": 4, "hw": 8},
}


def _build(model: str, sizes: dict):
    import equinox as eqx
    import jax
    import numpy as np

    from eqx_steps.models import DnCNN, UNet

    key = jax.random.key(0)
    rng = np.random.default_rng(1)
    if model == "tiny":
        net = eqx.nn.MLP(16, 4, 32, depth=2, activation=jax.nn.relu, key=key)
        x = rng.normal(size=(sizes["batch"], 16)).astype(np.float32)
        y = rng.normal(size=(sizes["batch"], 4)).astype(np.float32)
        return net, None, {"image": x, "label": y}
    cls = DnCNN if model == "dncnn" else UNet
    net, state = eqx.nn.make_with_state(cls)(
        sizes["depth"], 1, sizes["filters"], key=key
    )
    shape = (sizes["batch"], sizes["hw"], sizes["hw"], 1)
    y = rng.normal(size=shape).astype(np.float32)
    return net, state, {"image": y + 0.1 * rng.normal(size=shape).astype(np.float32),
                        "label": y}  # fmt: skip


def _plain_step(tx):
    """The hand-written loop's step: what a user writes without the library."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_steps as es

    @eqx.filter_jit
    def step(model, model_state, opt_state, batch):
        def loss_fn(model):
            if model_state is None:
                out = jax.vmap(model)(batch["image"])
                new_state = None
            else:
                out, new_state = jax.vmap(
                    model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
                )(batch["image"], model_state)
            return jnp.mean((out - batch["label"]) ** 2), (out, new_state)

        (loss, (out, new_state)), grads = eqx.filter_value_and_grad(
            loss_fn, has_aux=True
        )(model)
        updates, opt_state = tx.update(
            grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
        )
        # The metrics a training loop logs, as the library's step reports them.
        metrics = {"loss": loss, "snr": es.snr(batch["label"], out)}
        return eqx.apply_updates(model, updates), new_state, opt_state, metrics

    return step


def run(model: str, impl: str, backend: str, quick: bool) -> dict:
    """One case in this process (JAX must not have started): its times."""
    import equinox as eqx
    import jax
    import numpy as np
    import optax

    import eqx_steps as es

    sizes = (QUICK_SIZES if quick else SIZES)[model]
    net, net_state, batch = _build(model, sizes)
    tx = optax.adam(1e-3)
    result = {"model": model, "impl": impl, "backend": backend,
              "devices": jax.device_count(), "quick": quick}  # fmt: skip
    if impl == "plain":
        opt_state = tx.init(eqx.filter(net, eqx.is_inexact_array))
        jax.block_until_ready((net, opt_state))
        step = _plain_step(tx)
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(net, net_state, opt_state, batch)
        float(out[-1]["loss"])
        result["first_step_s"] = time.perf_counter() - t0
        result["cpu_s"] = time.process_time() - c0
        return result
    state = es.TrainState.create(net, tx, model_state=net_state)
    jax.block_until_ready(state)
    policy = "ignore" if impl == "library-ignore" else "raise"
    step = es.parallel_train_step(
        1e-3, es.mse_loss, es.compute_metrics, backend=backend, nan_policy=policy
    )
    t0, c0 = time.perf_counter(), time.process_time()
    _, metrics = step(state, es.shard(batch))
    float(metrics["loss"])
    result["first_step_s"] = time.perf_counter() - t0
    result["cpu_s"] = time.process_time() - c0
    # The split, on a second step object (same program: JAX's caches are warm
    # for tracing-level work, so read these as a breakdown, not as a sum).
    step2 = es.parallel_train_step(
        1e-3, es.mse_loss, es.compute_metrics, backend=backend, nan_policy=policy
    )
    t0 = time.perf_counter()
    lowered = step2.lower(state, es.shard(batch))  # pyright: ignore
    t1 = time.perf_counter()
    lowered.compile()
    result.update(trace_s=t1 - t0, compile_s=time.perf_counter() - t1)
    del np
    return result


def run_fresh(model: str, impl: str, backend: str, devices: int, quick: bool) -> dict:
    """`run` in a fresh process on `devices` CPU devices (XLA's flags as the
    benchmarks set them)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    code = (
        "import sys, json\n"
        "from eqx_steps.platform import configure_xla_flags\n"
        f"configure_xla_flags({devices})\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import first_step\n"
        f"print('RESULT ' + json.dumps(first_step.run({model!r}, {impl!r}, "
        f"{backend!r}, {quick!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{model} {impl} failed:\n{out.stderr[-3000:]}")
    line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def compare(model: str, backend: str, devices: int, repeats: int, quick: bool) -> dict:
    """Alternating fresh processes, plain then library; medians and their ratio."""
    runs = []
    for _ in range(repeats):
        runs.append(run_fresh(model, "plain", backend, devices, quick))
        runs.append(run_fresh(model, "library", backend, devices, quick))

    def med(impl, key):
        return statistics.median(r[key] for r in runs if r["impl"] == impl)

    return {"model": model, "backend": backend, "devices": devices,
            "library_s": med("library", "first_step_s"),
            "plain_s": med("plain", "first_step_s"),
            "ratio": med("library", "first_step_s") / med("plain", "first_step_s"),
            "library_cpu_s": med("library", "cpu_s"),
            "plain_cpu_s": med("plain", "cpu_s"),
            "cpu_ratio": med("library", "cpu_s") / med("plain", "cpu_s"),
            "runs": runs, "load": os.getloadavg()[0]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dncnn")
    parser.add_argument(
        "--impl", default="library", choices=("library", "plain", "library-ignore")
    )
    parser.add_argument("--backend", default="pmap")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--models", default="tiny,dncnn,unet")
    parser.add_argument("--backends", default="pmap,sharded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not args.compare:
        for d in args.devices.split(","):
            print(json.dumps(run_fresh(args.model, args.impl, args.backend, int(d),
                                       args.quick)))  # fmt: skip
        return
    for d in args.devices.split(","):
        for m in args.models.split(","):
            for b in args.backends.split(","):
                r = compare(m, b, int(d), args.repeats, args.quick)
                print(
                    f"{m:6s} {b:8s} {d} dev: library {r['library_s']:.2f} s, plain "
                    f"{r['plain_s']:.2f} s, ratio {r['ratio']:.3f}; CPU time "
                    f"{r['library_cpu_s']:.2f} / {r['plain_cpu_s']:.2f} s, ratio "
                    f"{r['cpu_ratio']:.3f} (load {r['load']:.2f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()

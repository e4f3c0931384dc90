"""SCICO's DnCNN training step side by side with the library's, on one CPU device.

SCICO is never a dependency of this project: give this script the Python of a
scratch environment that has it, e.g.

    python3 -m venv /tmp/scico_venv
    /tmp/scico_venv/bin/pip install "scico==0.0.7" "jax==0.8.1" "jaxlib==0.8.1" flax
    python benchmarks/scico_compare.py --scico-python /tmp/scico_venv/bin/python

The workload is the one of the issue's table: DnCNN of depth 6 with 32 filters,
64x64x1 images, batch 16, Adam, one CPU device. SCICO runs its own
`scico.flax.train.steps.train_step` under `jax.pmap` (Flax `DnCNNNet`, NHWC,
with the jax it was installed with); the library runs
`eqx_steps.parallel_train_step` (backend "pmap", default `nan_policy="raise"`)
on `eqx_steps.models.DnCNN` in this environment, with the XLA flags of the
command line (`eqx_steps.platform.configure_xla_flags`). Each run is a fresh process
timing `--steps` steps after a warm-up; the two alternate `--repeats` times so
that both see the same machine. Prints one JSON line per run and a Markdown
table: the fastest step of all runs (min) and the median of the runs' medians.

`--neighbours K` runs K CPU-bound busy loops beside both for the whole
comparison (a user's machine is rarely idle); `--library-xla-flags` and
`--scico-xla-flags` set the XLA flags of each side (e.g. to compare threading
settings under contention). `--also-library-xla-flags=FLAGS` adds a third
alternating run of the library with those flags, e.g.
`--also-library-xla-flags=--xla_cpu_experimental_ynn_fusion_type=` for the
library's setting before it gave reductions to YNNPACK. `--conv-floor` adds a
run of the step's 17 convolutions alone (the gradient of six circular 3x3
convolutions in a chain, no batch norm, no activation, no optimizer, compiled
with the library's XLA options): the floor of the step on this CPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time


SHAPE = (16, 64, 64, 1)  # batch, height, width, channels
DEPTH, FILTERS, LR = 6, 32, 1e-3


def _batch():
    import numpy as np

    rng = np.random.default_rng(1)
    label = rng.normal(size=SHAPE).astype(np.float32)
    image = label + 0.1 * rng.normal(size=SHAPE).astype(np.float32)
    return {"image": image, "label": label}


def _time(step, state, batch, steps: int) -> dict:
    import jax
    import numpy as np

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "jax": jax.__version__,
        "first_call_s": first,
        "min_ms": 1e3 * min(times),
        "median_ms": 1e3 * float(np.median(times)),
    }


def child_scico(steps: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    from scico.flax import DnCNNNet
    from scico.flax.train.diagnostics import compute_metrics
    from scico.flax.train.losses import mse_loss
    from scico.flax.train.state import create_basic_train_state
    from scico.flax.train.steps import train_step

    def lr_fn(step):
        return LR

    model = DnCNNNet(depth=DEPTH, channels=SHAPE[-1], num_filters=FILTERS)
    state = create_basic_train_state(
        jax.random.PRNGKey(0), {"opt_type": "ADAM"}, model, SHAPE[1:], lr_fn
    )
    state = jax.device_put_replicated(state, jax.local_devices())
    batch = {k: jnp.asarray(v)[None] for k, v in _batch().items()}
    step = jax.pmap(
        functools.partial(
            train_step,
            learning_rate_fn=lr_fn,
            criterion=mse_loss,
            metrics_fn=compute_metrics,
        ),
        axis_name="batch",
        donate_argnums=(0,),
    )
    timing = _time(step, state, batch, steps)
    return {
        "impl": "SCICO 0.0.7 train_step, jax.pmap",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **timing,
    }


def child_library(steps: int, label: str = "") -> dict:
    import equinox as eqx
    import jax
    import optax

    import eqx_steps as es
    from eqx_steps.models import DnCNN

    model, model_state = eqx.nn.make_with_state(DnCNN)(
        DEPTH, SHAPE[-1], FILTERS, key=jax.random.key(0)
    )
    state = es.TrainState.create(model, optax.adam(LR), model_state=model_state)
    step = es.parallel_train_step(
        lambda step: LR, es.mse_loss, es.compute_metrics, backend="pmap"
    )
    return {
        "impl": "eqx_steps parallel_train_step, pmap" + label,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **_time(step, state, es.shard(_batch()), steps),
    }


def child_convs(steps: int) -> dict:
    """The training step's convolutions alone: forward, input gradients and
    kernel gradients of the DnCNN's six layers, with the circular padding."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from eqx_steps.platform import compiler_options

    rng = np.random.default_rng(0)
    sizes = [SHAPE[-1]] + [FILTERS] * (DEPTH - 1) + [SHAPE[-1]]
    kernels = [
        jnp.asarray(0.1 * rng.normal(size=(3, 3, i, o)), jnp.float32)
        for i, o in zip(sizes[:-1], sizes[1:])
    ]

    def loss(kernels, x):
        for k in kernels:
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
            x = lax.conv_general_dilated(
                x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return jnp.mean(x**2)

    grad = jax.jit(
        jax.grad(loss), compiler_options=compiler_options(jax.default_backend())
    )
    image = jnp.asarray(_batch()["image"])

    def step(kernels, batch):
        g = grad(kernels, batch)
        return kernels, g[0]

    return {
        "impl": "the step's 17 convolutions alone (jax.jit, circular padding)",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **_time(step, kernels, image, steps),
    }


@contextlib.contextmanager
def neighbours(n: int):
    """`n` busy-loop processes running for the duration, as the CPU-bound
    neighbours a user's machine often has."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _run(
    python: str, which: str, steps: int, flags: str | None = None, label: str = ""
) -> dict:
    """One fresh process of `which`; `flags`: its `XLA_FLAGS` (the library's:
    `None` for the command's default: `eqx_steps.platform.configure_xla_flags`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if which == "scico":
        # SCICO's jax is older: only the device count, no flag it may not know.
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=1 {flags or ''}"
    elif flags is not None:
        env["XLA_FLAGS"] = flags
    argv = [python, os.path.abspath(__file__), "--child", which, "--steps", str(steps)]
    out = subprocess.run(
        argv + (["--label", label] if label else []),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"the {which} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scico-python", help="the Python of an environment with scico")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=5, help="runs of each, alternating")
    p.add_argument(
        "--library-xla-flags",
        help="XLA_FLAGS of the library's runs instead of the command's default "
        "(YNNPACK for reductions only); '' for XLA's defaults",
    )
    p.add_argument("--scico-xla-flags", help="extra XLA_FLAGS of SCICO's runs")
    p.add_argument(
        "--also-library-xla-flags",
        help="a third run of the library, alternating, with these XLA_FLAGS",
    )
    p.add_argument(
        "--neighbours",
        type=int,
        default=0,
        help="CPU-bound processes (busy loops) to run beside the measured ones",
    )
    p.add_argument(
        "--conv-floor",
        action="store_true",
        help="a third (or fourth) run: the step's convolutions alone",
    )
    p.add_argument(
        "--child", choices=("scico", "library", "convs"), help=argparse.SUPPRESS
    )
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "scico":
        print(json.dumps(child_scico(args.steps)))
        return
    if args.child in ("library", "convs"):
        from eqx_steps.platform import configure_xla_flags

        configure_xla_flags(1)
        if args.child == "library":
            print(json.dumps(child_library(args.steps, args.label)))
        else:
            print(json.dumps(child_convs(args.steps)))
        return
    if not args.scico_python:
        p.error("--scico-python is required (see the module docstring)")
    runs: dict[str, list[dict]] = {}
    sides = [
        ("scico", args.scico_python, args.scico_xla_flags, ""),
        ("library", sys.executable, args.library_xla_flags, ""),
    ]
    if args.also_library_xla_flags is not None:
        flags = args.also_library_xla_flags
        sides.append(("library", sys.executable, flags, f", XLA_FLAGS={flags}"))
    if args.conv_floor:
        sides.append(("convs", sys.executable, args.library_xla_flags, ""))
    with neighbours(args.neighbours):
        for _ in range(args.repeats):
            for which, python, flags, label in sides:
                r = _run(python, which, args.steps, flags, label)
                r["neighbours"] = args.neighbours
                print(json.dumps(r), flush=True)
                runs.setdefault(r["impl"], []).append(r)
    print()
    if args.neighbours:
        print(f"beside {args.neighbours} CPU-bound neighbour process(es)")
    print("| implementation | jax | min ms / step | median ms / step | first call |")
    print("|---|---|---:|---:|---:|")
    for impl, rs in runs.items():
        print(
            f"| {impl} | {rs[0]['jax']} | {min(r['min_ms'] for r in rs):.1f} "
            f"| {statistics.median(r['median_ms'] for r in rs):.1f} "
            f"| {statistics.median(r['first_call_s'] for r in rs):.2f} s |"
        )


if __name__ == "__main__":
    main()

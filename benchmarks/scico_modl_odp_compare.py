"""SCICO's MoDL and ODP training steps beside the library's, on one CPU device.

SCICO is never a dependency of this project: give this script the Python of a
scratch environment that has it (see `benchmarks/scico_compare.py`):

    python benchmarks/scico_modl_odp_compare.py \\
        --scico-python /tmp/scico_venv/bin/python

The workload is the one of `benchmarks/test_modl_odp.py`: deblurring 64x64
images by a 5x5 Gaussian PSF (`CircularConvolve`), batch 8, `depth=2`,
`num_filters=16`, `block_depth=3`, MoDL with `cg_iter=5`, ODP with deconvolution
blocks; Adam (learning rate 1e-3) and `clip_positive` on `lmbda` / `alpha`
(minval 5e-4) after every update. SCICO runs `scico.flax.MoDLNet` /
`ODPNet(odp_block=ODPProxDcnvBlock)` through its `train_step_post` under
`jax.pmap(axis_name="batch")`, as its `BasicFlaxTrainer` does, with the jax it
was installed with; the library runs `eqx_steps.models.MoDLNet` / `ODPNet`
through `eqx_steps.parallel_train_step(post_lst=...)` with its defaults, with
the XLA flags of the command line. Each run is a fresh process timing `--steps`
steps after a warm-up (`scico_compare._time`); SCICO and the library alternate
`--repeats` times. Prints one JSON line per run and a Markdown table: the
median over runs of each run's median time per step, and the ratio
library / SCICO.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from scico_compare import neighbours


SIZE, BATCH, FILTERS = 64, 8, 16
DEPTH, BLOCK_DEPTH, CG_ITER = 2, 3, 5
LR, MINVAL = 1e-3, 5e-4


def _configure(size: int, batch: int, filters: int) -> None:
    global SIZE, BATCH, FILTERS
    SIZE, BATCH, FILTERS = size, batch, filters


def _time(step, state, batch, steps: int) -> dict:
    """Wall and CPU (process) time per step after a warm-up: on a shared machine
    the CPU time, the work done by all the process's threads, moves less with
    the load than the wall time."""
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
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / steps
    return {
        "jax": jax.__version__,
        "first_call_s": first,
        "min_ms": 1e3 * min(times),
        "median_ms": 1e3 * float(np.median(times)),
        "cpu_ms": 1e3 * cpu,
    }


def _psf():
    import numpy as np

    t = np.arange(5) - 2.0
    g = np.exp(-(t**2) / 2)
    return (np.outer(g, g) / np.outer(g, g).sum()).astype(np.float32)


def _batch():
    """Random images and their blurred noisy versions (NumPy only)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(BATCH, SIZE, SIZE)).astype(np.float32)
    h = np.fft.fft2(_psf(), s=(SIZE, SIZE))
    y = np.fft.ifft2(h * np.fft.fft2(x, axes=(1, 2)), axes=(1, 2)).real
    y = y + 0.05 * rng.standard_normal(y.shape)
    return {"image": y[..., None].astype(np.float32), "label": x[..., None]}


def child_scico(kind: str, steps: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    from flax import jax_utils
    from scico import flax as sflax
    from scico.flax.inverse import ODPProxDcnvBlock
    from scico.flax.train.diagnostics import compute_metrics
    from scico.flax.train.losses import mse_loss
    from scico.flax.train.state import create_basic_train_state
    from scico.flax.train.steps import train_step, train_step_post
    from scico.flax.train.traversals import clip_positive, construct_traversal
    from scico.linop import CircularConvolve

    def lr_fn(step):
        return LR

    op = CircularConvolve(h=jnp.asarray(_psf()), input_shape=(SIZE, SIZE))
    kw = dict(
        operator=op,
        depth=DEPTH,
        channels=1,
        num_filters=FILTERS,
        block_depth=BLOCK_DEPTH,
    )
    if kind == "modl":
        model, name = sflax.MoDLNet(cg_iter=CG_ITER, **kw), "lmbda"
    else:
        model, name = sflax.ODPNet(odp_block=ODPProxDcnvBlock, **kw), "alpha"
    state = create_basic_train_state(
        jax.random.PRNGKey(0), {"opt_type": "ADAM"}, model, (SIZE, SIZE), lr_fn
    )
    state = jax_utils.replicate(state)
    batch = {k: jnp.asarray(v)[None] for k, v in _batch().items()}
    post = [
        functools.partial(
            clip_positive, traversal=construct_traversal(name), minval=MINVAL
        )
    ]
    step = jax.pmap(
        functools.partial(
            train_step_post,
            train_step_fn=train_step,
            learning_rate_fn=lr_fn,
            criterion=mse_loss,
            metrics_fn=compute_metrics,
            post_lst=post,
        ),
        axis_name="batch",
    )
    return {
        "impl": f"SCICO 0.0.7 train_step_post, jax.pmap ({kind})",
        "kind": kind,
        "library": "scico",
        **_time(step, state, batch, steps),
    }


def child_library(kind: str, steps: int) -> dict:
    import functools

    import equinox as eqx
    import jax
    import optax

    import eqx_steps as es
    from eqx_steps.models import MoDLNet, ODPNet
    from eqx_steps.operators import CircularConvolve

    op = CircularConvolve(_psf(), (SIZE, SIZE))
    key = jax.random.key(0)
    if kind == "modl":
        model, model_state = eqx.nn.make_with_state(MoDLNet)(
            op, DEPTH, 1, FILTERS, BLOCK_DEPTH, CG_ITER, key=key
        )
        name = "lmbda"
    else:
        model, model_state = eqx.nn.make_with_state(ODPNet)(
            op, DEPTH, 1, FILTERS, BLOCK_DEPTH, "deconv", key=key
        )
        name = "alpha"
    state = es.TrainState.create(model, optax.adam(LR), model_state=model_state)
    post = [
        functools.partial(
            es.clip_positive, traversal=es.construct_traversal(name), minval=MINVAL
        )
    ]
    step = es.parallel_train_step(
        lambda step: LR, es.mse_loss, es.compute_metrics, post_lst=post
    )
    return {
        "impl": f"eqx_steps parallel_train_step, pmap ({kind})",
        "kind": kind,
        "library": "eqx_steps",
        **_time(step, state, es.shard(_batch()), steps),
    }


def _run(python: str, which: str, kind: str, steps: int, sizes: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if which == "scico":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    cmd = [python, os.path.abspath(__file__), "--child", which, "--kind", kind]
    cmd += ["--steps", str(steps), *sizes]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"the {which} run failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scico-python", help="the Python of an environment with scico")
    p.add_argument("--kinds", default="modl,odp", help="modl, odp or both")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--size", type=int, default=SIZE, help="image size")
    p.add_argument("--batch", type=int, default=BATCH, help="batch size")
    p.add_argument("--filters", type=int, default=FILTERS, help="num_filters")
    p.add_argument("--neighbours", type=int, default=0, help="busy-loop processes")
    p.add_argument("--json", help="write the runs and the table here")
    p.add_argument("--child", choices=("scico", "library"), help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=("modl", "odp"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _configure(args.size, args.batch, args.filters)
    sizes = ["--size", str(args.size), "--batch", str(args.batch)]
    sizes += ["--filters", str(args.filters)]
    if args.child == "scico":
        print(json.dumps(child_scico(args.kind, args.steps)))
        return
    if args.child == "library":
        from eqx_steps.platform import configure_xla_flags

        configure_xla_flags(1)
        print(json.dumps(child_library(args.kind, args.steps)))
        return
    if not args.scico_python:
        p.error("--scico-python is required (see the module docstring)")
    runs: list[dict] = []
    with neighbours(args.neighbours):
        for kind in args.kinds.split(","):
            for _ in range(args.repeats):
                for which in ("scico", "library"):
                    python = args.scico_python if which == "scico" else sys.executable
                    r = _run(python, which, kind, args.steps, sizes)
                    print(json.dumps(r), flush=True)
                    runs.append(r)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    table = []
    for kind in args.kinds.split(","):
        row: dict = {"kind": kind}
        for lib in ("scico", "eqx_steps"):
            mine = [r for r in runs if r["kind"] == kind and r["library"] == lib]
            row[f"{lib}_ms"] = statistics.median(r["median_ms"] for r in mine)
            row[f"{lib}_cpu_ms"] = statistics.median(r["cpu_ms"] for r in mine)
        row["ratio"] = row["eqx_steps_ms"] / row["scico_ms"]
        row["cpu_ratio"] = row["eqx_steps_cpu_ms"] / row["scico_cpu_ms"]
        table.append(row)
    setup = {"size": SIZE, "batch": BATCH, "filters": FILTERS, "steps": args.steps}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"setup": setup, "runs": runs, "table": table, "uptime": uptime},
                f,
                indent=1,
            )
    print(f"\n{setup}; {uptime}")
    print(
        "| step | SCICO ms / step | eqx_steps ms / step | ratio "
        "| SCICO CPU ms / step | eqx_steps CPU ms / step | CPU ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in table:
        print(
            f"| {row['kind']} | {row['scico_ms']:.1f} | {row['eqx_steps_ms']:.1f} "
            f"| {row['ratio']:.2f} | {row['scico_cpu_ms']:.1f} "
            f"| {row['eqx_steps_cpu_ms']:.1f} | {row['cpu_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()

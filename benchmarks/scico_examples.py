"""SCICO's deblurring example scripts, scaled to a CPU, with eqx_steps and with SCICO.

SCICO's `deconv_modl_train_foam1.py` and `deconv_odp_train_foam1.py` train
`MoDLNet` and `ODPNet` (deconvolution blocks) to deblur foam phantoms (a 3x3
uniform PSF, each blurred image divided by its maximum, Gaussian noise of std
20/255, clipped to [0, 1]) with SGD (momentum 0.9, Nesterov), learning rate
1e-2, batch 16, 64 filters; MoDL with `block_depth=4`, `cg_iter=4`, in two
stages (depth 1, then depth 2 from the first stage's weights; 25 epochs each),
`clip_positive` keeping `lmbda` above 5e-4; ODP with depth 2, `block_depth=3`,
50 epochs, `alpha` above 1e-3. At 256x256 with 416 training images they report
a test SNR of 16.2 dB (MoDL) and 16.4 dB (ODP) on 8 GPUs.

This script runs that recipe scaled down (`--size`, `--n-train`, `--n-test`,
`--epochs`, `--filters`; every other setting is SCICO's) with both libraries on
the SAME data, in the SAME batch order, from the SAME initial weights:

1. It writes the data once (`--data`, an `.npz`): foam phantoms drawn here with
   NumPy (a disk of value 1 with up to 300 non-overlapping circular holes of radii
   in [0.0025, 0.075] of the image width, like xdesign's `Foam(size_range=[0.075,
   0.0025], gap=1e-3, porosity=1)` that SCICO uses, rendered with 4x4
   supersampling), blurred, normalised, noised and clipped as SCICO's
   `generate_blur_data` does; the per-epoch shuffles; the recipe.
2. SCICO trains in a child process of its scratch environment
   (`benchmarks/scico_examples_scico.py`, `--scico-python`): SCICO's
   `create_basic_train_state` and `train_step_post` under `jax.pmap`, as its
   `BasicFlaxTrainer` runs them, and saves its initial variables and its test
   outputs (`FlaxMap`, inference mode).
3. eqx_steps trains in a fresh child process of this environment: the same
   networks (`eqx_steps.models.MoDLNet` / `ODPNet`, loaded with SCICO's initial
   variables by `from_scico_variables`, or with their own initialisation with
   `--own-init`), `optax.sgd(..., nesterov=True)`, `parallel_train_step` with
   `clip_positive` (the library's defaults otherwise), MoDL's second stage by
   `with_depth`; test outputs by `per_example(..., inference=True)`.

Both run on one CPU device and time every step (`block_until_ready` after each);
the time per step is the median over the steps of all stages, leaving out each
stage's first two (compilation, warm-up). The two libraries alternate (SCICO,
eqx_steps, SCICO, ...) `--repeats` times. The test SNR is SCICO's
`metric.snr` (variance of the truth over the mean squared error, in dB) of the
outputs clipped to [0, 1] over the whole test set, as the example scripts
compute it. Prints one JSON line per run and a Markdown table, and writes the
results to `--json`.

    python benchmarks/scico_examples.py --scico-python /tmp/scico_venv/bin/python

Not part of the test suite (SCICO is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


HERE = os.path.dirname(os.path.abspath(__file__))
SIGMA = 20.0 / 255
PSF_SIZE = 3


def recipe(filters: int, epochs: int, batch_size: int, seed: int) -> dict:
    """SCICO's settings of the two example scripts, with the epochs and filters
    scaled (`epochs` per MoDL stage; ODP trains `2 * epochs`, as the scripts' 25
    + 25 and 50)."""
    return {
        "seed": seed,
        "momentum": 0.9,
        "learning_rate": 1e-2,
        "batch_size": batch_size,
        "modl": {
            "weight": "lmbda",
            "minval": 5e-4,
            "num_filters": filters,
            "block_depth": 4,
            "cg_iter": 4,
            "stages": [[1, epochs], [2, epochs]],
        },
        "odp": {
            "weight": "alpha",
            "minval": 1e-3,
            "num_filters": filters,
            "block_depth": 3,
            "stages": [[2, 2 * epochs]],
        },
    }


# ------------------------------------------------------------------ data


def foam(rng: np.random.Generator, size: int, supersample: int = 4) -> np.ndarray:
    """One foam phantom `(size, size)` in [0, 1]: a centred disk of value 1 (radius
    0.5 of the width) with up to 300 non-overlapping holes (value 0) of radii in
    [0.0025, 0.075], at least 1e-3 apart, inside the disk."""
    holes: list[tuple[float, float, float]] = []
    for _ in range(300):
        r = rng.uniform(0.0025, 0.075)
        cy, cx = rng.uniform(-0.5 + r, 0.5 - r, 2)
        if np.hypot(cy, cx) + r > 0.5:
            continue
        if all(np.hypot(cy - y, cx - x) >= r + s + 1e-3 for y, x, s in holes):
            holes.append((cy, cx, r))
    n = size * supersample
    t = (np.arange(n) + 0.5) / n - 0.5
    yy, xx = np.meshgrid(t, t, indexing="ij")
    img = (yy**2 + xx**2 <= 0.25).astype(np.float32)
    for cy, cx, r in holes:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.0
    return img.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def blur(psf: np.ndarray, images: np.ndarray) -> np.ndarray:
    """SCICO's `CircularConvolve` (origin at `psf[0, 0]`) of `(n, H, W)` images."""
    h = np.fft.fft2(psf, s=images.shape[1:])
    return np.fft.ifft2(h * np.fft.fft2(images, axes=(1, 2)), axes=(1, 2)).real


def make_data(path: str, size: int, n_train: int, n_test: int, rec: dict) -> None:
    """Write the phantoms, their blurred noisy versions (SCICO's
    `generate_blur_data`), the per-epoch batch order and the recipe to `path`."""
    rng = np.random.default_rng(rec["seed"])
    x = np.stack([foam(rng, size) for _ in range(n_train + n_test)]).astype(np.float32)
    x = np.clip(x, 0, 1)
    psf = np.ones((PSF_SIZE, PSF_SIZE), np.float32) / PSF_SIZE**2
    y = blur(psf, x)
    y = y / y.max(axis=(1, 2), keepdims=True)
    y = np.clip(y + SIGMA * rng.standard_normal(y.shape), 0, 1).astype(np.float32)
    bs = rec["batch_size"]
    epochs = max(sum(e for _, e in rec[m]["stages"]) for m in ("modl", "odp"))
    order = np.stack(
        [
            rng.permutation(n_train)[: n_train // bs * bs].reshape(-1, bs)
            for _ in range(epochs)
        ]
    )
    np.savez(
        path,
        train_image=y[:n_train, ..., None],
        train_label=x[:n_train, ..., None],
        test_image=y[n_train:, ..., None],
        test_label=x[n_train:, ..., None],
        psf=psf,
        order=order,
        recipe=json.dumps(rec),
    )


def snr(reference: np.ndarray, comparison: np.ndarray) -> float:
    """SCICO's `metric.snr`: `10 log10(var(reference) / mse)` over all pixels."""
    ref = np.asarray(reference, np.float64)
    mse = np.mean((ref - np.asarray(comparison, np.float64)) ** 2)
    return float(10 * np.log10(np.var(ref) / mse))


# ------------------------------------------------------------------ eqx_steps


def child_library(data: str, model_name: str, out: str, init: str | None) -> dict:
    """eqx_steps' side: train on `data` as SCICO's script does, write the test
    outputs to `out`; start from SCICO's initial variables in `init` if given."""
    import functools

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqx_steps as es
    from eqx_steps.models import from_scico_variables, MoDLNet, ODPNet
    from eqx_steps.operators import CircularConvolve

    d = dict(np.load(data, allow_pickle=False))
    rec = json.loads(str(d["recipe"]))
    conf = rec[model_name]
    size = d["train_image"].shape[1]
    op = CircularConvolve(d["psf"], (size, size))
    key = jax.random.key(rec["seed"])
    stages = conf["stages"]
    build = MoDLNet if model_name == "modl" else ODPNet
    last = conf["cg_iter"] if model_name == "modl" else "deconv"
    args = (op, stages[0][0], 1, conf["num_filters"], conf["block_depth"], last)
    if init is None:
        model, model_state = eqx.nn.make_with_state(build)(*args, key=key)
    else:
        # SCICO's initial variables, in the model built by its constructor
        # (`from_scico_variables` makes the state).
        flat = dict(np.load(init, allow_pickle=False))
        variables: dict = {}
        for path, value in flat.items():
            if not path.startswith("init/"):
                continue
            *parents, leaf = path[len("init/") :].split("/")
            node = variables
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = value
        model, model_state = from_scico_variables(build(*args, key=key), variables)

    schedule = optax.constant_schedule(rec["learning_rate"])
    post = [
        functools.partial(
            es.clip_positive,
            traversal=es.construct_traversal(conf["weight"]),
            minval=conf["minval"],
        )
    ]
    step = es.parallel_train_step(
        schedule, es.mse_loss, es.compute_metrics, post_lst=post
    )
    order = d["order"]
    times, cpu_times, epoch0, losses = [], [], 0, []
    for depth, epochs in stages:
        if model_name == "modl":
            model = model.with_depth(depth)
        tx = optax.sgd(schedule, momentum=rec["momentum"], nesterov=True)
        state = es.TrainState.create(model, tx, model_state=model_state)
        stage_times, stage_cpu = [], []
        for e in range(epoch0, epoch0 + epochs):
            for idx in order[e]:
                batch = es.shard(
                    {"image": d["train_image"][idx], "label": d["train_label"][idx]}
                )
                t0, c0 = time.perf_counter(), time.process_time()
                state, metrics = step(state, batch)
                jax.block_until_ready((state, metrics))
                stage_times.append(time.perf_counter() - t0)
                stage_cpu.append(time.process_time() - c0)
            losses.append(float(np.mean(metrics["loss"])))
        epoch0 += epochs
        times.append(stage_times)
        cpu_times.append(stage_cpu)
        model, model_state = state.model, state.model_state

    output, _ = es.per_example(
        model, model_state, jnp.asarray(d["test_image"]), inference=True
    )
    np.savez(out, output=np.asarray(output))
    return {
        "library": "eqx_steps",
        "jax": jax.__version__,
        "model": model_name,
        "devices": jax.local_device_count(),
        "step_times_s": times,
        "step_cpu_s": cpu_times,
        "epoch_losses": losses,
    }


# ------------------------------------------------------------------ driver


def _child(cmd: list[str], env: dict) -> dict:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def steady_ms(step_times: list[list[float]], skip: int = 2) -> float:
    """Median time per step (ms) over all stages, each stage's first `skip` left out."""
    kept = [t for stage in step_times for t in stage[min(skip, len(stage) - 1) :]]
    return 1e3 * statistics.median(kept)


def run(args, model_name: str, which: str, k: int) -> dict:
    out = os.path.join(args.workdir, f"{which}_{model_name}_{k}.npz")
    init = os.path.join(args.workdir, f"scico_{model_name}_0.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if which == "scico":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        script = os.path.join(HERE, "scico_examples_scico.py")
        cmd = [args.scico_python, script, "--data", args.data]
        cmd += ["--model", model_name, "--out", out]
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", model_name]
        cmd += ["--data", args.data, "--out", out]
        if not args.own_init:
            cmd += ["--init", init]
    t0 = time.perf_counter()
    r = _child(cmd, env)
    r["wall_s"] = time.perf_counter() - t0
    d = np.load(args.data, allow_pickle=False)
    output = np.clip(np.load(out)["output"], 0, 1)
    r["test_snr_db"] = snr(d["test_label"], output)
    r["ms_per_step"] = steady_ms(r["step_times_s"])
    r["cpu_ms_per_step"] = steady_ms(r["step_cpu_s"])
    r["steps"] = sum(len(s) for s in r["step_times_s"])
    r["load"] = os.getloadavg()
    del r["step_times_s"], r["step_cpu_s"]
    return r


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scico-python", help="the Python of an environment with scico")
    p.add_argument("--size", type=int, default=32, help="image size (SCICO: 256)")
    p.add_argument("--n-train", type=int, default=128, help="SCICO: 416")
    p.add_argument("--n-test", type=int, default=32, help="SCICO: 64")
    p.add_argument(
        "--epochs", type=int, default=4, help="per MoDL stage; ODP twice (SCICO: 25)"
    )
    p.add_argument("--filters", type=int, default=64, help="SCICO: 64")
    p.add_argument("--batch-size", type=int, default=16, help="SCICO: 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="modl,odp")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each")
    p.add_argument("--own-init", action="store_true", help="eqx_steps' own weights")
    p.add_argument("--workdir", default="/tmp/scico_examples")
    p.add_argument("--data", help="the data file (default: WORKDIR/data.npz)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=("modl", "odp"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        from eqx_steps.platform import configure_xla_flags

        configure_xla_flags(1)
        print(json.dumps(child_library(args.data, args.child, args.out, args.init)))
        return
    if not args.scico_python:
        p.error("--scico-python is required (see the module docstring)")
    os.makedirs(args.workdir, exist_ok=True)
    args.data = args.data or os.path.join(args.workdir, "data.npz")
    rec = recipe(args.filters, args.epochs, args.batch_size, args.seed)
    make_data(args.data, args.size, args.n_train, args.n_test, rec)
    d = np.load(args.data, allow_pickle=False)
    blurred = snr(d["test_label"], d["test_image"])
    setup = {
        "size": args.size,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "epochs_per_modl_stage": args.epochs,
        "odp_epochs": 2 * args.epochs,
        "filters": args.filters,
        "batch_size": args.batch_size,
        "own_init": args.own_init,
        "blurred_test_snr_db": blurred,
        "recipe": rec,
    }
    print(json.dumps(setup), flush=True)
    runs = []
    for model_name in args.models.split(","):
        for k in range(args.repeats):
            for which in ("scico", "library"):
                r = run(args, model_name, which, k)
                print(json.dumps(r), flush=True)
                runs.append(r)
    table = []
    for model_name in args.models.split(","):
        rs = {
            w: [
                r
                for r in runs
                if r["model"] == model_name
                and (r["library"] == "eqx_steps") == (w == "eqx")
            ]
            for w in ("scico", "eqx")
        }
        row = {"model": model_name}
        for w, lst in rs.items():
            row[f"{w}_snr_db"] = statistics.median(r["test_snr_db"] for r in lst)
            row[f"{w}_ms_per_step"] = statistics.median(r["ms_per_step"] for r in lst)
            row[f"{w}_cpu_ms_per_step"] = statistics.median(
                r["cpu_ms_per_step"] for r in lst
            )
        row["ratio"] = row["eqx_ms_per_step"] / row["scico_ms_per_step"]
        row["cpu_ratio"] = row["eqx_cpu_ms_per_step"] / row["scico_cpu_ms_per_step"]
        row["snr_diff_db"] = row["eqx_snr_db"] - row["scico_snr_db"]
        table.append(row)
    result = {"setup": setup, "runs": runs, "table": table, "uptime": _uptime()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nblurred test images: {blurred:.2f} dB; load {result['uptime']}")
    print(
        "| model | SNR SCICO | SNR eqx_steps | ms/step SCICO | ms/step eqx_steps "
        "| ratio | CPU ms/step SCICO | CPU ms/step eqx_steps | CPU ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in table:
        print(
            f"| {row['model']} | {row['scico_snr_db']:.2f} dB "
            f"| {row['eqx_snr_db']:.2f} dB | {row['scico_ms_per_step']:.0f} "
            f"| {row['eqx_ms_per_step']:.0f} | {row['ratio']:.2f} "
            f"| {row['scico_cpu_ms_per_step']:.0f} | {row['eqx_cpu_ms_per_step']:.0f} "
            f"| {row['cpu_ratio']:.2f} |"
        )


def _uptime() -> str:
    done = subprocess.run(["uptime"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


if __name__ == "__main__":
    main()

"""Time per training step of MoDL and ODP beside a hand-written `jax.jit` baseline.

The library side is what a user runs: `eqx_steps.models.MoDLNet` /
`ODPNet(block="deconv")` on a `CircularConvolve` deblurring problem, trained by
`eqx_steps.parallel_train_step` with Adam and `clip_positive` on the
regularisation weight (`train_step_post`), on one device. The baseline is the
same math written by hand on flat arrays under one raw `jax.jit`: NHWC
convolutions with HWIO kernels, batch norm by the batch statistics (with the
hand-stated derivative of `workloads._batch_norm`), the batched FFT operator,
SCICO's fixed-iteration CG per example, Adam, the clip. The first step of both
is checked to agree before anything is timed.

Each test times rounds of the library and of the baseline interleaved (same
load) and records `extra_info["ratio"]` = median library / median baseline
(wall time), and `extra_info["cpu_ratio"]`, the same with the process's CPU
time (which moves less with a shared machine's load).
Run: `pytest benchmarks/test_modl_odp.py --benchmark-only` (with
`EQX_STEPS_BENCH_DEVICES=1` or the default 4; only the first device is used).
"""

from __future__ import annotations

import functools
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import workloads as w
from jax import lax

import eqx_steps as es
from eqx_steps.models import MoDLNet, ODPNet
from eqx_steps.operators import CircularConvolve


MINVAL = 5e-4
DEPTH, BLOCK_DEPTH, CG_ITER = 2, 3, 5


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(size=16, batch=2, filters=4, rounds=1, calls=1)
    return dict(size=64, batch=8, filters=16, rounds=15, calls=4)


def _psf() -> np.ndarray:
    t = np.arange(5) - 2.0
    g = np.exp(-(t**2) / 2)
    return (np.outer(g, g) / np.outer(g, g).sum()).astype(np.float32)


def _problem(kind: str, s: dict):
    op = CircularConvolve(_psf(), (s["size"], s["size"]))
    key = jax.random.PRNGKey(0)
    if kind == "modl":
        model, state = eqx.nn.make_with_state(MoDLNet)(
            op, DEPTH, 1, s["filters"], BLOCK_DEPTH, CG_ITER, key=key
        )
    else:
        model, state = eqx.nn.make_with_state(ODPNet)(
            op, DEPTH, 1, s["filters"], BLOCK_DEPTH, "deconv", key=key
        )
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(s["batch"], s["size"], s["size"], 1)).astype(np.float32)
    y = jax.vmap(op)(jnp.asarray(x[..., 0]))[..., None]
    y = np.asarray(y) + 0.05 * rng.standard_normal(y.shape).astype(np.float32)
    return op, model, state, {"image": y, "label": x}


# ------------------------------------------------------------------ by hand


def _conv(x, w):
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
    return lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _resnet(params, stats, x):
    """`params`: (w, g, b) per layer; `stats`: (count, mean, var) per layer."""
    res, new = x, []
    for i, ((wt, g, b), (count, mean_r, var_r)) in enumerate(zip(params, stats)):
        y, mean, var = w._batch_norm(_conv(x, wt), g, b, 1e-5)
        new.append((count + 1, 0.99 * mean_r + 0.01 * mean, 0.99 * var_r + 0.01 * var))
        x = jax.nn.relu(y) if i < len(params) - 1 else y
    return x + res, new


def _fft_op(h_dft, v, adjoint=False):
    h = jnp.conj(h_dft) if adjoint else h_dft
    return jnp.fft.ifftn(h * jnp.fft.fftn(v, axes=(1, 2)), axes=(1, 2)).real


def _cg(A, b, n):
    def dot(u, v):
        return jnp.sum(u * v, axis=(1, 2))[:, None, None]

    def step(carry, _):
        x, r, p, num = carry
        ap = A(p)
        den = dot(p, ap)
        alpha = jnp.where(den != 0, num / jnp.where(den != 0, den, 1), 0)
        x, r = x + alpha * p, r - alpha * ap
        new = dot(r, r)
        beta = jnp.where(num != 0, new / jnp.where(num != 0, num, 1), 0)
        return (x, r, r + beta * p, new), None

    return lax.scan(step, (jnp.zeros_like(b), b, b, dot(b, b)), None, length=n)[0][0]


def _forward_modl(h_dft, params, stats, y):
    (lmbda,), layers = params[0], params[1:]
    ahb = _fft_op(h_dft, y[..., 0], adjoint=True)[..., None]

    def normal(v):
        return _fft_op(h_dft, _fft_op(h_dft, v), adjoint=True) + lmbda * v

    x = ahb
    for _ in range(DEPTH):
        z, stats = _resnet(layers, stats, x)
        x = _cg(normal, (ahb + lmbda * z)[..., 0], CG_ITER)[..., None]
    return x, stats


def _forward_odp(h_dft, opnorm, params, stats, y):
    aty = _fft_op(h_dft, y[..., 0], adjoint=True)[..., None]
    x, new_stats, per = aty, [], BLOCK_DEPTH
    for i in range(DEPTH):
        (alpha,), layers = (
            params[i * (per + 1)],
            params[i * (per + 1) + 1 : (i + 1) * (per + 1)],
        )
        d, s = _resnet(layers, stats[i * per : (i + 1) * per], x)
        new_stats += s
        scale = 1.0 / (alpha * opnorm**2 + 1)
        z = alpha * aty + d
        x = jnp.fft.irfftn(
            jnp.fft.rfftn(z, axes=(1, 2)) / scale, s=z.shape[1:3], axes=(1, 2)
        )
    return x, new_stats


def _layers(resnet, state):
    convs = [b.conv for b in resnet.blocks] + [resnet.conv_end]
    norms = [b.norm for b in resnet.blocks] + [resnet.norm_end]
    params = [
        (jnp.transpose(c.weight, (2, 3, 1, 0)), n.weight, n.bias)
        for c, n in zip(convs, norms)
    ]
    stats = [
        (state.get(n.batch_counter), *state.get(n.batch_state_index)) for n in norms
    ]
    return params, stats


def _raw(kind, model, state, op):
    """The flat parameters, statistics and the jitted hand-written step."""
    if kind == "modl":
        p, stats = _layers(model.resnet, state)
        params = [(model.lmbda,), *p]
        weight_index = 0
    else:
        params, stats = [], []
        for b in model.blocks:
            p, s = _layers(b.resnet, state)
            params += [(b.alpha,), *p]
            stats += s
        weight_index = None
    h_dft = jnp.fft.fftn(op.psf, s=op.input_shape)
    opnorm = jnp.float32(model.operator_norm) if kind == "odp" else None

    def forward(params, stats, y):
        if kind == "modl":
            return _forward_modl(h_dft, params, stats, y)
        return _forward_odp(h_dft, opnorm, params, stats, y)

    def step(arrays, batch):
        params, stats, count, mu, nu = arrays
        y, x = batch["image"], batch["label"]

        def loss_fn(p):
            out, new_stats = forward(p, stats, y)
            return jnp.mean(0.5 * (out - x) ** 2), (out, new_stats)

        (loss, (out, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        count = count + 1
        mu = jax.tree.map(lambda m, g: w.B1 * m + (1 - w.B1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: w.B2 * v + (1 - w.B2) * g**2, nu, grads)
        c1 = 1 - w.B1 ** count.astype(jnp.float32)
        c2 = 1 - w.B2 ** count.astype(jnp.float32)
        params = jax.tree.map(
            lambda p, m, v: p + (-w.LR) * ((m / c1) / (jnp.sqrt(v / c2) + w.EPS)),
            params,
            mu,
            nu,
        )
        # clip_positive on lmbda (MoDL) or every alpha (ODP): the 1-tuples.
        params = [
            (jnp.maximum(t[0], MINVAL),)
            if len(t) == 1 and (weight_index is None or i == weight_index)
            else t
            for i, t in enumerate(params)
        ]
        metrics = {
            "loss": loss,
            "snr": w._snr(x, out),
            "learning_rate": jnp.float32(w.LR),
        }
        return (params, stats, count, mu, nu), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    arrays = (params, stats, jnp.zeros((), jnp.int32), zeros, zeros)
    return jax.tree.map(lambda a: jnp.array(a, copy=True), arrays), jax.jit(
        step, donate_argnums=0
    )


# ------------------------------------------------------------------ timing


def _round(fn, carry, batch, calls):
    """`calls` steps: the carry, the wall time and the process's CPU time."""
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        carry, metrics = fn(carry, batch)
    jax.block_until_ready((carry, metrics))
    return carry, time.perf_counter() - t, time.process_time() - cpu


@pytest.mark.parametrize("kind", ["modl", "odp"])
def test_train_step_vs_jit_baseline(benchmark, quick, kind):
    s = _sizes(quick)
    op, model, state, batch = _problem(kind, s)
    name = "lmbda" if kind == "modl" else "alpha"
    post = [
        functools.partial(
            es.clip_positive, traversal=es.construct_traversal(name), minval=MINVAL
        )
    ]
    device = jax.devices()[0]
    lib = es.parallel_train_step(
        w.learning_rate_fn,
        es.mse_loss,
        es.compute_metrics,
        post_lst=post,
        donate=True,
        nan_policy="ignore",
        devices=[device],
    )
    lib_state = es.TrainState.create(model, w.TX, model_state=state)
    lib_batch = jax.device_put(es.shard(batch, devices=[device]), device)
    raw_arrays, raw = _raw(kind, model, state, op)
    raw_batch = jax.device_put(batch, device)

    # Same math: the first step's loss and weight agree.
    lib_state, lib_m = lib(lib_state, lib_batch)
    raw_arrays, raw_m = raw(raw_arrays, raw_batch)
    np.testing.assert_allclose(float(lib_m["loss"]), float(raw_m["loss"]), rtol=1e-4)
    lib_w = lib_state.model.lmbda if kind == "modl" else lib_state.model.blocks[0].alpha
    np.testing.assert_allclose(lib_w, raw_arrays[0][0][0], rtol=1e-4)

    lib_times, raw_times, lib_cpu, raw_cpu = [], [], [], []
    carry = {"lib": lib_state, "raw": raw_arrays}

    def library_round():
        carry["lib"], t, c = _round(lib, carry["lib"], lib_batch, s["calls"])
        lib_times.append(t)
        lib_cpu.append(c)
        carry["raw"], t, c = _round(raw, carry["raw"], raw_batch, s["calls"])
        raw_times.append(t)
        raw_cpu.append(c)

    benchmark.pedantic(library_round, rounds=s["rounds"], iterations=1)
    ratio = statistics.median(lib_times) / statistics.median(raw_times)
    # CPU time (all threads) moves less with a shared machine's load.
    cpu_ratio = statistics.median(lib_cpu) / statistics.median(raw_cpu)
    per_step = statistics.median(lib_times) / s["calls"]
    benchmark.extra_info.update(
        ratio=ratio,
        cpu_ratio=cpu_ratio,
        library_ms_per_step=1e3 * per_step,
        baseline_ms_per_step=1e3 * statistics.median(raw_times) / s["calls"],
        sizes=s,
    )
    print(
        f"\n{kind}: library {1e3 * per_step:.1f} ms/step, ratio {ratio:.3f}, "
        f"CPU-time ratio {cpu_ratio:.3f}"
    )

"""The benchmarked workloads: the library's steps and hand-written baselines.

Two workloads, each built twice, once with `eqx_steps` and once by hand:

- `"tiny"`: an MLP 16-32-32-4 (ReLU), global batch 32, Adam. Dispatch-bound: the
    figure is the cost of a call.
- `"dncnn"`: DnCNN of depth 6 with 32 filters on 64x64x1 images, global batch 16,
    Adam. Compute-bound: the figure is the cost of the step's math.

A baseline does exactly the math of the library call it is compared with (same
forward pass, loss, metrics, gradient, `pmean`s, Adam update, batch-norm
statistics, clipping), on a flat tuple of parameter and optimizer-state arrays,
with raw `jax.jit`, raw `jax.pmap` or raw `jax.jit` over `jax.shard_map`.
`test_equivalence.py` checks that it does.

Nothing here is timed; `test_steps.py` times it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import eqx_steps as es
from eqx_steps.losses import mse_loss
from eqx_steps.metrics import compute_metrics
from eqx_steps.models import DnCNN
from eqx_steps.postprocess import clip_range, construct_traversal


LR = 1e-3
TX = optax.adam(LR)  # built once: a new optax object would be a new static value
B1, B2, EPS = 0.9, 0.999, 1e-8  # optax.adam's defaults, for the hand-written Adam
CLIP = (-0.5, 0.5)  # the range of the clipping post-processor (weights only)
MAX_IN_FLIGHT = 8  # as eqx_steps/parallel/_throttle.py (CPU only there)


def learning_rate_fn(step):
    return LR


# ---------------------------------------------------------------------------
# Sizes.


@dataclasses.dataclass(frozen=True)
class Sizes:
    batch: int  # global batch
    # tiny
    features: tuple[int, ...] = (16, 32, 32, 4)
    # dncnn
    depth: int = 6
    filters: int = 32
    hw: int = 64
    channels: int = 1


SIZES = {
    "tiny": Sizes(batch=32),
    "dncnn": Sizes(batch=16),
}
# `--benchmark-disable` (CI) runs every case once to keep the suite from rotting;
# these keep that run short.
QUICK_SIZES = {
    "tiny": Sizes(batch=32),
    "dncnn": Sizes(batch=16, depth=3, filters=8, hw=16),
}


# ---------------------------------------------------------------------------
# The library side.


def library_model(workload: str, sizes: Sizes, seed: int = 0):
    """The workload's Equinox model and its `eqx.nn.State` (or `None`)."""
    key = jax.random.key(seed)
    if workload == "tiny":
        f = sizes.features
        model = eqx.nn.MLP(
            f[0], f[-1], f[1], depth=len(f) - 2, activation=jax.nn.relu, key=key
        )
        return model, None
    return eqx.nn.make_with_state(DnCNN)(
        sizes.depth, sizes.channels, sizes.filters, key=key
    )


def post_lst():
    """The post-processors of the `post` cases: clip every weight to `CLIP`."""
    return [
        functools.partial(
            clip_range,
            traversal=construct_traversal("weight"),
            minval=CLIP[0],
            maxval=CLIP[1],
        )
    ]


def library_step(
    kind: str,
    backend: str,
    *,
    donate: bool = True,
    steps_per_call: int = 1,
    unroll: int | bool | str = "auto",
    nan_policy: str = "ignore",
    shard_optimizer_state: bool = False,
):
    """The library's parallel callable for `kind` in `train`, `post`, `eval`."""
    if kind == "eval":
        return es.parallel_eval_step(mse_loss, compute_metrics, backend=backend)
    return es.parallel_train_step(
        learning_rate_fn,
        mse_loss,
        compute_metrics,
        post_lst=post_lst() if kind == "post" else None,
        backend=backend,
        donate=donate,
        steps_per_call=steps_per_call,
        nan_policy=nan_policy,
        unroll=unroll,
        shard_optimizer_state=shard_optimizer_state,
    )


def library_state(workload: str, sizes: Sizes, seed: int = 0) -> es.TrainState:
    model, model_state = library_model(workload, sizes, seed)
    return es.TrainState.create(model, TX, model_state=model_state)


# ---------------------------------------------------------------------------
# Batches: the same placed arrays feed the library and the baselines.


def mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (es.DEVICE_AXIS,))


def batch(workload: str, sizes: Sizes, steps_per_call: int = 1, seed: int = 1):
    """A global batch `(n_devices, per_device, ...)`, or `(K, n_devices, ...)`,
    placed one slice per device."""
    n = jax.device_count()
    if sizes.batch % n:
        raise ValueError(f"global batch {sizes.batch} is not divisible by {n} devices")
    if workload == "tiny":
        x_shape, y_shape = (sizes.features[0],), (sizes.features[-1],)
    else:
        x_shape = y_shape = (sizes.hw, sizes.hw, sizes.channels)
    rng = np.random.default_rng(seed)
    lead = (n, sizes.batch // n)
    if steps_per_call > 1:
        lead = (steps_per_call, *lead)
    x = rng.normal(size=lead + x_shape).astype(np.float32)
    if workload == "tiny":
        y = rng.normal(size=lead + y_shape).astype(np.float32)
    else:  # a noisy image and its clean version
        y = x
        x = y + 0.1 * rng.normal(size=y.shape).astype(np.float32)
    spec = P(es.DEVICE_AXIS) if steps_per_call == 1 else P(None, es.DEVICE_AXIS)
    sharding = NamedSharding(mesh(), spec)
    return {"image": jax.device_put(x, sharding), "label": jax.device_put(y, sharding)}


def single_device_batch(b):
    """`(n_devices, per_device, ...)` -> `(global, ...)` on the first device."""
    dev = jax.devices()[0]
    return {
        k: jax.device_put(np.asarray(v).reshape(-1, *v.shape[2:]), dev)
        for k, v in b.items()
    }


# ---------------------------------------------------------------------------
# The hand-written baselines.


class RawNet:
    """A network written with `jnp`/`lax` only, on tuples of arrays.

    `params` and `net_state` are tuples of arrays; `apply(params, net_state, x,
    train)` returns `(output, net_state)`; `weights` are the indices of the
    parameters the `post` cases clip (those whose library path holds "weight").
    """

    params: tuple
    net_state: tuple
    weights: tuple[int, ...]
    apply: Callable


class RawMLP(RawNet):
    """The MLP as `x @ W + b` with ReLU, `W` stored `(in, out)`."""

    def __init__(self, model: eqx.nn.MLP):
        self.params = tuple(
            a for layer in model.layers for a in (layer.weight.T, layer.bias)
        )
        self.net_state = ()
        self.weights = tuple(range(0, len(self.params), 2))

    @staticmethod
    def apply(params, net_state, x, train):
        n = len(params) // 2
        for i in range(n):
            x = x @ params[2 * i] + params[2 * i + 1]
            if i < n - 1:
                x = jax.nn.relu(x)
        return x, net_state


class RawDnCNN(RawNet):
    """DnCNN as NHWC `lax.conv_general_dilated` with HWIO kernels.

    (`layout="OIHW"` keeps the kernels as Equinox stores them, as a reference
    that separates the cost of the kernel layout from that of the library.)

    Circular padding, no bias, batch norm in batch mode (statistics over the
    device's batch and space, running averages with momentum 0.99, Equinox's
    zero-debiasing at inference, the derivative stated by hand as the library's
    `ChannelsLastBatchNorm` states it), `x - net(x)`.
    """

    momentum = 0.99
    eps = 1e-5

    def __init__(self, model, model_state, layout: str = "HWIO"):
        # The convolutions and batch norms in call order (attribute order).
        layers = [
            x
            for x in jax.tree_util.tree_leaves(
                model, is_leaf=lambda x: isinstance(x, (eqx.nn.Conv, eqx.nn.BatchNorm))
            )
            if isinstance(x, (eqx.nn.Conv, eqx.nn.BatchNorm))
        ]
        kernels = [c.weight for c in layers if isinstance(c, eqx.nn.Conv)]
        norms = [c for c in layers if isinstance(c, eqx.nn.BatchNorm)]
        for c in layers:
            if isinstance(c, eqx.nn.Conv):
                assert c.bias is None and c.padding_mode == "CIRCULAR", c
        assert len(norms) == len(kernels) - 2, (len(norms), len(kernels))

        def kernel(k):  # k: (out, in, kh, kw)
            return jnp.transpose(k, (2, 3, 1, 0)) if layout == "HWIO" else k

        params = [kernel(kernels[0])]
        for k, bn in zip(kernels[1:-1], norms):
            assert bn.mode == "batch" and bn.momentum == self.momentum
            params += [kernel(k), bn.weight, bn.bias]
        params.append(kernel(kernels[-1]))
        self.params = tuple(params)
        self.depth = len(kernels)
        # (counter, running mean, running var) of each batch norm, in that order.
        self.net_state = tuple(jax.tree_util.tree_leaves(model_state))
        assert len(self.net_state) == 3 * len(norms)
        # What construct_traversal("weight") selects: kernels and batch-norm scales.
        self.weights = tuple(
            i for i in range(len(params)) if i % 3 != 0 or i in (0, len(params) - 1)
        )
        self.apply = functools.partial(self._apply, self.depth, layout)

    @classmethod
    def _apply(cls, depth, layout, params, net_state, x, train):
        def conv(y, w):
            y = jnp.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
            return lax.conv_general_dilated(
                y, w, (1, 1), "VALID", dimension_numbers=("NHWC", layout, "NHWC")
            )

        base = x
        y = jax.nn.relu(conv(x, params[0]))
        new_state = []
        for i in range(depth - 2):
            w, g, b = params[1 + 3 * i : 4 + 3 * i]
            count, hmean, hvar = net_state[3 * i : 3 * i + 3]
            y = conv(y, w)
            if train:
                y, mean, var = _batch_norm(y, g, b, cls.eps)
                m = cls.momentum
                new_state += [
                    count + 1,
                    hmean * m + mean * (1 - m),
                    hvar * m + var * (1 - m),
                ]
            else:
                scale = jnp.where(count == 0, 1, 1 - cls.momentum**count)
                mean, var = hmean / scale, hvar / scale
                y = (y - mean) / jnp.sqrt(var + cls.eps) * g + b
            y = jax.nn.relu(y)
        out = base - conv(y, params[-1])
        return out, tuple(new_state) if train else net_state


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _batch_norm(y, g, b, eps):
    """Batch norm of `y` (N, H, W, C) by its batch statistics, and the statistics,
    with the derivative stated by hand as the library's batch norm states it
    (two reductions of the cotangent per layer instead of autodiff's four)."""
    mean = jnp.mean(y, axis=(0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean((y - mean) ** 2, axis=(0, 1, 2)))
    return (y - mean) * (lax.rsqrt(var + eps) * g) + b, mean, var


@_batch_norm.defjvp
def _batch_norm_jvp(eps, primals, tangents):
    y, g, b = primals
    dy, dg, db = tangents
    out, mean, var = _batch_norm(y, g, b, eps)
    inv_std = lax.rsqrt(var + eps)
    y_hat = (y - mean) * inv_std
    scale = g * inv_std
    mean_dy = jnp.mean(dy, axis=(0, 1, 2))
    mean_dy_y_hat = jnp.mean(dy * y_hat, axis=(0, 1, 2))
    d_out = scale * dy + (db - scale * mean_dy) + y_hat * (dg - scale * mean_dy_y_hat)
    return (out, mean, var), (d_out, mean_dy, 2 * mean_dy_y_hat / inv_std)


def raw_net(workload: str, model, model_state=None, layout: str = "HWIO") -> RawNet:
    """The baseline's network, with the parameters and state of the library's."""
    if workload == "tiny":
        return RawMLP(model)
    return RawDnCNN(model, model_state, layout)


def _snr(ref, x):
    return 10.0 * jnp.log10(jnp.var(ref) / jnp.mean(jnp.abs(ref - x) ** 2))


def raw_state(net: RawNet) -> tuple:
    """The flat tuple `(step, *params, *net_state, count, *mu, *nu)`."""
    zeros = tuple(jnp.zeros_like(p) for p in net.params)
    return (
        jnp.zeros((), jnp.int32),
        *net.params,
        *net.net_state,
        jnp.zeros((), jnp.int32),
        *zeros,
        *zeros,
    )


def _unpack(net: RawNet, arrays):
    n_p, n_s = len(net.params), len(net.net_state)
    step = arrays[0]
    params = arrays[1 : 1 + n_p]
    net_state = arrays[1 + n_p : 1 + n_p + n_s]
    count = arrays[1 + n_p + n_s]
    mu = arrays[2 + n_p + n_s : 2 + 2 * n_p + n_s]
    nu = arrays[2 + 2 * n_p + n_s :]
    return step, params, net_state, count, mu, nu


def raw_train_step(net: RawNet, post: bool, axis, arrays, batch):
    """One hand-written Adam step on one device.

    `(arrays, batch) -> (arrays, metrics)`, for the train and post cases; the
    `pmean`s are left out when `axis` is `None`.
    """
    step, params, net_state, count, mu, nu = _unpack(net, arrays)
    x, y = batch["image"], batch["label"]

    def loss_fn(params):
        out, new_net_state = net.apply(params, net_state, x, True)
        return jnp.mean(0.5 * (out - y) ** 2), (out, new_net_state)

    (loss, (out, net_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = {"loss": loss, "snr": _snr(y, out)}
    if axis is not None:
        grads = lax.pmean(grads, axis)
        metrics = lax.pmean(metrics, axis)
        net_state = tuple(
            lax.pmean(s, axis) if jnp.issubdtype(s.dtype, jnp.floating) else s
            for s in net_state
        )
    # Adam, as optax.adam(LR): bias-corrected moments, then -LR * m / (sqrt(v) + eps).
    count = count + 1
    mu = tuple(B1 * m + (1 - B1) * g for m, g in zip(mu, grads))
    nu = tuple(B2 * v + (1 - B2) * g**2 for v, g in zip(nu, grads))
    c1 = 1 - B1 ** count.astype(jnp.float32)
    c2 = 1 - B2 ** count.astype(jnp.float32)
    params = tuple(
        p + (-LR) * ((m / c1) / (jnp.sqrt(v / c2) + EPS))
        for p, m, v in zip(params, mu, nu)
    )
    if post:
        params = tuple(
            jnp.minimum(jnp.maximum(p, CLIP[0]), CLIP[1]) if i in net.weights else p
            for i, p in enumerate(params)
        )
    metrics["learning_rate"] = jnp.asarray(LR, jnp.float32)
    return (step + 1, *params, *net_state, count, *mu, *nu), metrics


def raw_eval_step(net: RawNet, axis, arrays, batch):
    _, params, net_state, *_ = _unpack(net, arrays)
    out, _ = net.apply(params, net_state, batch["image"], False)
    y = batch["label"]
    metrics = {"loss": jnp.mean(0.5 * (out - y) ** 2), "snr": _snr(y, out)}
    return metrics if axis is None else lax.pmean(metrics, axis)


def raw_step(
    net: RawNet,
    kind: str,
    backend: str,
    *,
    donate: bool = True,
    steps_per_call: int = 1,
    unroll: int | bool = True,
):
    """The hand-written counterpart of `library_step`.

    `backend` is `"pmap"` (raw `jax.pmap`), `"sharded"` (raw `jax.jit` over
    `jax.shard_map`) or `"jit"` (raw `jax.jit` on one device, whole global batch,
    no collective). Returns `(arrays, batch) -> (arrays, metrics)` for training,
    `(arrays, batch) -> metrics` for `"eval"`.
    """
    axis = None if backend == "jit" else es.DEVICE_AXIS
    if kind == "eval":
        body = functools.partial(raw_eval_step, net, axis)
    else:
        one = functools.partial(raw_train_step, net, kind == "post", axis)
        if steps_per_call == 1:
            body = one
        else:

            def body(arrays, batch):
                return lax.scan(one, arrays, batch, unroll=unroll)

    donate_argnums = (0,) if donate and kind != "eval" else ()
    out_axes = None if kind == "eval" else (None, None)
    if backend == "jit":
        return jax.jit(body, donate_argnums=donate_argnums)
    if backend == "pmap":
        return jax.pmap(
            body,
            axis_name=es.DEVICE_AXIS,
            in_axes=(None, 0 if steps_per_call == 1 else 1),
            out_axes=out_axes,
            donate_argnums=donate_argnums,
        )
    squeeze = 0 if steps_per_call == 1 else 1
    spec = P(es.DEVICE_AXIS) if steps_per_call == 1 else P(None, es.DEVICE_AXIS)

    def per_device(arrays, batch):
        return body(arrays, jax.tree_util.tree_map(lambda x: x.squeeze(squeeze), batch))

    mapped = jax.shard_map(
        per_device,
        mesh=mesh(),
        in_specs=(P(), spec),
        out_specs=P() if kind == "eval" else (P(), P()),
        check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=donate_argnums)


def place_raw_state(arrays, backend: str):
    """Copy the baseline's arrays onto every device (or the first, for `"jit"`)."""
    if backend == "jit":
        where: Any = jax.devices()[0]
    else:
        where = NamedSharding(mesh(), P())
    return tuple(jax.device_put(jnp.array(a, copy=True), where) for a in arrays)


class Throttle:
    """Keep at most `MAX_IN_FLIGHT` calls queued, as the library does.

    XLA:CPU's in-process collectives deadlock when dozens of multi-device calls
    are queued; the library blocks on the oldest result beyond 8 in flight on
    CPU when a step spans more than one device (one array of the call's
    outputs stands for the call), and the baselines do exactly the same so the
    comparison stays fair: `devices` is the baseline's own device count (1 for
    the single-device `jit` baselines, which then queue freely).
    """

    def __init__(self, devices: int | None = None, n: int = MAX_IN_FLIGHT):
        devices = jax.device_count() if devices is None else devices
        self.on = devices > 1 and jax.default_backend() == "cpu"
        self.n = n
        self.queue: collections.deque = collections.deque()

    def __call__(self, out):
        if not self.on:
            return
        self.queue.append(jax.tree_util.tree_leaves(out)[0])
        while len(self.queue) > self.n:
            self.queue.popleft().block_until_ready()

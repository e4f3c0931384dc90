"""Generate scico_modl_odp.npz: SCICO 0.0.7's MoDL/ODP numbers for the fidelity tests.

Runs ONLY in a scratch environment with SCICO 0.0.7 and jax 0.8.1 (never in
the test suite; SCICO is not a dependency of eqx_steps or of its tests):

    /tmp/scico_venv/bin/python tests/data/make_scico_modl_odp.py

The problem (issue 20): 32x32 images, a 5x5 Gaussian PSF, batch 4; MoDL and ODP
(deconvolution blocks) with depth=2, num_filters=8, block_depth=3, cg_iter=5.
Stored (float32): the Flax variables (with batch norms and running averages
perturbed from their initial 1/0 so that every mapping is exercised), the
measurements and targets, the forward outputs in training and inference mode,
the updated batch statistics, and, on 1, 2 and 4 devices, the parameters and
the device-averaged batch statistics after one and two `train_step_post` steps
with Adam and `clip_positive` (the second step's `minval` is above a weight's
value, so the clip fires). A few smaller forward checks cover the other models
of `eqx_steps.models` and ODP's other blocks. Keys: `<case>|<what>|<flax path>`.
"""

import os


os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import jax_utils  # noqa: E402
from scico import flax as sflax, linop  # noqa: E402
from scico.flax.inverse import (  # noqa: E402
    ODPGrDescBlock,
    ODPProxDcnvBlock,
    ODPProxDnBlock,
)
from scico.flax.train.diagnostics import compute_metrics  # noqa: E402
from scico.flax.train.losses import mse_loss  # noqa: E402
from scico.flax.train.state import create_basic_train_state  # noqa: E402
from scico.flax.train.steps import train_step, train_step_post  # noqa: E402
from scico.flax.train.traversals import clip_positive, construct_traversal  # noqa: E402
from scico.linop.xray import XRayTransform2D  # noqa: E402


OUT = {}
LR = 1e-3


def gaussian_psf(size: int = 5, sigma: float = 1.0) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    psf = np.outer(g, g)
    return (psf / psf.sum()).astype(np.float32)


def disks(rng, n, size):
    """Unions of random disks in [0, 1] (foam-like), (n, size, size, 1)."""
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        for _ in range(6):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(size / 10, size / 4)
            out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0.3, 1.0)
    return out[..., None]


def flat(tree, prefix=""):
    if not hasattr(tree, "items"):
        return {prefix: np.asarray(tree, np.float32)}
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def store(case, what, tree):
    for path, value in flat(tree).items():
        OUT[f"{case}|{what}|{path}"] = value


def perturb(variables, seed):
    """Batch-norm scales/biases and running averages away from 1/0."""
    rng = np.random.default_rng(seed)

    def fix(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return leaf + 0.1 * noise
        if name in ("bias", "mean"):
            return leaf + 0.1 * noise
        if name == "var":
            return leaf + 0.5 * np.abs(noise)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, variables)


def forward(case, model, variables, y):
    store(case, "variables", variables)
    out, upd = model.apply(variables, y, train=True, mutable=["batch_stats"])
    OUT[f"{case}|train_out|"] = np.asarray(out)
    store(case, "train_stats", upd["batch_stats"])
    OUT[f"{case}|infer_out|"] = np.asarray(model.apply(variables, y, train=False))


def steps(case, model, variables, y, x, name, minvals):
    """Two train_step_post steps on n = 1, 2, 4 devices (pmap, SCICO's way)."""
    config = {"opt_type": "ADAM", "batch_size": y.shape[0]}
    lr_fn = lambda step: LR  # noqa: E731
    for n in (1, 2, 4):
        state = create_basic_train_state(
            jax.random.PRNGKey(0), config, model, y.shape[1:], lr_fn, variables
        )
        state = jax_utils.replicate(state, jax.devices()[:n])
        batch = {
            "image": y.reshape(n, -1, *y.shape[1:]),
            "label": x.reshape(n, -1, *x.shape[1:]),
        }
        for k, minval in enumerate(minvals, 1):
            post = [
                partial(
                    clip_positive, traversal=construct_traversal(name), minval=minval
                )
            ]
            fn = jax.pmap(
                partial(
                    train_step_post,
                    learning_rate_fn=lr_fn,
                    criterion=mse_loss,
                    train_step_fn=train_step,
                    metrics_fn=compute_metrics,
                    post_lst=post,
                ),
                axis_name="batch",
            )
            state, metrics = fn(state, batch)
            store(
                case,
                f"step{k}_dev{n}_params",
                jax.tree_util.tree_map(lambda a: a[0], state.params),
            )
            store(
                case,
                f"step{k}_dev{n}_stats",
                jax.tree_util.tree_map(lambda a: a.mean(0), state.batch_stats),
            )
            OUT[f"{case}|step{k}_dev{n}_loss|"] = np.asarray(metrics["loss"]).mean()


def main():
    rng = np.random.default_rng(20)
    psf = gaussian_psf()
    A = linop.CircularConvolve(h=jnp.asarray(psf), input_shape=(32, 32))
    x = disks(rng, 4, 32)
    y = np.stack([np.asarray(A(xi[..., 0])) for xi in x])[..., None]
    y = (y + 0.05 * rng.standard_normal(y.shape)).astype(np.float32)
    OUT.update({"psf||": psf, "x||": x, "y||": y, "lr||": np.float32(LR)})
    kw = dict(depth=2, channels=1, num_filters=8, block_depth=3)

    modl = sflax.MoDLNet(operator=A, cg_iter=5, **kw)
    v = perturb(modl.init({"params": jax.random.PRNGKey(1)}, y[:1]), 1)
    forward("modl", modl, v, y)
    steps("modl", modl, v, y, x, "lmbda", (5e-4, 0.51))

    odp = sflax.ODPNet(operator=A, odp_block=ODPProxDcnvBlock, **kw)
    v = perturb(odp.init({"params": jax.random.PRNGKey(2)}, y[:1]), 2)
    forward("odp", odp, v, y)
    steps("odp", odp, v, y, x, "alpha", (5e-4, 0.3))

    # Smaller forward checks: 16x16, batch 2.
    xs, ys = x[:2, ::2, ::2], y[:2, ::2, ::2]
    A16 = linop.CircularConvolve(h=jnp.asarray(psf), input_shape=(16, 16))
    OUT["x16||"], OUT["y16||"] = xs, ys
    small = dict(depth=2, channels=1, num_filters=4, block_depth=2)
    odp = sflax.ODPNet(operator=A16, odp_block=ODPGrDescBlock, **small)
    forward(
        "odp_gd", odp, perturb(odp.init({"params": jax.random.PRNGKey(3)}, ys), 3), ys
    )
    ident = linop.Identity(input_shape=ys.shape)
    odp = sflax.ODPNet(operator=ident, odp_block=ODPProxDnBlock, **small)
    forward(
        "odp_dn", odp, perturb(odp.init({"params": jax.random.PRNGKey(4)}, ys), 4), ys
    )
    angles = np.linspace(0, np.pi, 10, endpoint=False).astype(np.float32)
    X = XRayTransform2D((16, 16), angles)
    sino = np.stack([np.asarray(X(xi[..., 0])) for xi in xs])[..., None]
    OUT["angles||"], OUT["sino16||"] = angles, sino
    modl = sflax.MoDLNet(operator=X, cg_iter=3, **small)
    forward(
        "modl_ct",
        modl,
        perturb(modl.init({"params": jax.random.PRNGKey(5)}, sino), 5),
        sino,
    )
    for case, m in (
        ("dncnn", sflax.DnCNNNet(depth=3, channels=1, num_filters=4)),
        ("convbn", sflax.ConvBNNet(depth=3, channels=1, num_filters=4)),
        ("resnet", sflax.ResNet(depth=3, channels=1, num_filters=4)),
        ("unet", sflax.UNet(depth=3, channels=1, num_filters=4)),
    ):
        forward(case, m, perturb(m.init({"params": jax.random.PRNGKey(6)}, ys), 6), ys)

    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "scico_modl_odp.npz"
    )
    np.savez_compressed(path, **OUT)
    print("wrote", path, len(OUT), "arrays", os.path.getsize(path), "bytes")
    for k in sorted(OUT):
        if "loss" in k:
            print(k, OUT[k])
    print(
        "modl lmbda after steps", [OUT[k] for k in sorted(OUT) if k.endswith("|lmbda")]
    )


if __name__ == "__main__":
    print("jax", jax.__version__, jax.devices())
    main()

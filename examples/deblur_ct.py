"""Deblurring and CT with MoDL and ODP: SCICO's model-based networks in Equinox.

Synthetic phantoms are blurred by a 5x5 Gaussian PSF (or projected by a
parallel-beam X-ray transform), with noise; `eqx_steps.models.MoDLNet` (trained
in SCICO's two stages) and `ODPNet` (deconvolution blocks) learn to restore them,
with Adam and `clip_positive` keeping the regularisation weights positive, as in
SCICO's example scripts. `examples/deblur_ct.png` shows truth | measurement |
restorations with their SNRs.

Run with `python examples/deblur_ct.py [--size 32 --steps 300]`. This is the code
of the tutorial "Deblurring and CT with MoDL and ODP"; `tests/test_modl_odp.py`
runs it with tiny settings.
"""

from __future__ import annotations

import argparse
import functools
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eqx_steps as es
from eqx_steps.models import MoDLNet, ODPNet
from eqx_steps.operators import CircularConvolve, XRayTransform2D


# --8<-- [start:data]
def gaussian_psf(size: int = 5, sigma: float = 1.0) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.outer(np.exp(-(t**2) / (2 * sigma**2)), np.exp(-(t**2) / (2 * sigma**2)))
    return (g / g.sum()).astype(np.float32)


@eqx.filter_jit
def apply_each(fn, images):
    """`fn` (an operator or its adjoint) on every image of a batch, compiled."""
    return jax.vmap(fn)(images)


def measure(op, images: np.ndarray, noise: float, seed: int) -> dict:
    """`{"image": A x + noise, "label": x}` for channels-last images `x`."""
    y = np.asarray(apply_each(op, images[..., 0]))[..., None]
    rng = np.random.default_rng(seed)
    y = y + noise * np.abs(y).max() * rng.standard_normal(y.shape)
    return {"image": y.astype(np.float32), "label": images}


def make_problem(task: str, size: int, n_train: int, n_test: int):
    """The operator and train/test sets of measurements and truths."""
    if task == "deblur":
        op = CircularConvolve(gaussian_psf(), (size, size))
    else:  # "ct": 2 * size angles over [0, pi)
        op = XRayTransform2D((size, size), np.linspace(0, np.pi, 2 * size, False))
    x = es.synthetic.make_phantoms(n_train + n_test, size=size, seed=1)
    return (
        op,
        measure(op, x[:n_train], 0.03, seed=2),
        measure(op, x[n_train:], 0.03, seed=3),
    )


# --8<-- [end:data]


def batches(dataset: dict, batch_size: int, steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(dataset["image"]), batch_size, replace=False)
        yield {k: v[idx] for k, v in dataset.items()}


# --8<-- [start:train]
def train(model, model_state, weight: str, data: dict, steps: int, batch_size: int):
    """Adam; after every update `clip_positive` keeps `weight` (`"lmbda"` of
    MoDL, `"alpha"` of ODP) above 5e-4, as SCICO's examples do."""
    post = [
        functools.partial(
            es.clip_positive, traversal=es.construct_traversal(weight), minval=5e-4
        )
    ]
    schedule = optax.constant_schedule(3e-3)
    state = es.TrainState.create(model, optax.adam(schedule), model_state=model_state)
    step = es.parallel_train_step(
        schedule, es.mse_loss, es.compute_metrics, post_lst=post
    )
    for batch in batches(data, batch_size, steps):
        state, _ = step(state, es.shard(batch))
    return state


# --8<-- [end:train]


def restore(state, data: dict) -> tuple[np.ndarray, float]:
    """The restored test images (inference mode) and their mean SNR."""
    # Compiled once (run op by op, the CG loops would dispatch every operation).
    out, _ = eqx.filter_jit(es.per_example)(
        state.model, state.model_state, jnp.asarray(data["image"]), inference=True
    )
    snr = jax.vmap(es.snr)(jnp.asarray(data["label"]), out)
    return np.asarray(out), float(jnp.mean(snr))


def main(
    size: int = 32,
    n_train: int = 256,
    steps: int = 300,
    batch_size: int = 16,
    filters: int = 16,
    picture: str | pathlib.Path | None = None,
) -> dict:
    """Train MoDL (two stages) and ODP for deblurring, MoDL for CT; return the
    test SNRs (dB) and draw the picture if `picture` is given."""
    n_test = 8
    key = jax.random.key(0)
    results, rows = {}, []

    # --8<-- [start:modl]
    op, train_ds, test_ds = make_problem("deblur", size, n_train, n_test)
    # Stage 1: one MoDL iteration, 3 CG iterations.
    model, model_state = eqx.nn.make_with_state(MoDLNet)(
        op, depth=1, channels=1, num_filters=filters, block_depth=4, cg_iter=3, key=key
    )
    stage1 = train(model, model_state, "lmbda", train_ds, steps // 2, batch_size)
    # Stage 2: the same weights, five iterations of MoDL, 5 CG iterations.
    deeper = stage1.model.with_depth(5, cg_iter=5)
    modl = train(deeper, stage1.model_state, "lmbda", train_ds, steps // 2, batch_size)
    # --8<-- [end:modl]

    # --8<-- [start:odp]
    model, model_state = eqx.nn.make_with_state(ODPNet)(
        op, depth=3, channels=1, num_filters=filters, block_depth=3, block="deconv",
        key=key,
    )  # fmt: skip
    odp = train(model, model_state, "alpha", train_ds, steps, batch_size)
    # --8<-- [end:odp]

    blurred_snr = float(jnp.mean(jax.vmap(es.snr)(test_ds["label"], test_ds["image"])))
    modl_out, results["deblur_modl"] = restore(modl, test_ds)
    odp_out, results["deblur_odp"] = restore(odp, test_ds)
    results["blurred"] = blurred_snr
    rows.append(
        [
            ("truth", test_ds["label"]),
            (f"blurred {blurred_snr:.1f} dB", test_ds["image"]),
            (f"MoDL {results['deblur_modl']:.1f} dB", modl_out),
            (f"ODP {results['deblur_odp']:.1f} dB", odp_out),
        ]
    )

    # --8<-- [start:ct]
    op, train_ds, test_ds = make_problem("ct", size, n_train, n_test)
    model, model_state = eqx.nn.make_with_state(MoDLNet)(
        op, depth=1, channels=1, num_filters=filters, block_depth=4, cg_iter=5, key=key
    )
    ct = train(model, model_state, "lmbda", train_ds, steps, batch_size)
    # --8<-- [end:ct]
    ct_out, results["ct_modl"] = restore(ct, test_ds)
    back = np.asarray(apply_each(op.adj, test_ds["image"][..., 0]))[..., None]
    back = back * float(np.sum(back * test_ds["label"]) / np.sum(back * back))
    results["ct_backprojection"] = float(
        jnp.mean(jax.vmap(es.snr)(test_ds["label"], back))
    )
    rows.append(
        [
            ("truth", test_ds["label"]),
            (f"back-projection {results['ct_backprojection']:.1f} dB", back),
            (f"MoDL (CT) {results['ct_modl']:.1f} dB", ct_out),
        ]
    )
    print(", ".join(f"{k}: {v:.2f} dB" for k, v in results.items()))
    if picture is not None:
        draw(rows, picture)
    return results


def draw(rows, path) -> None:
    """Truth | measurement | restorations of the first test image, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(2.4 * width, 2.6 * len(rows)))
    for r, row in enumerate(rows):
        for c in range(width):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(row):
                title, images = row[c]
                ax.imshow(np.asarray(images)[0, ..., 0], cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    # Without an accelerator, split the CPU into devices before JAX starts.
    es.platform.configure_xla_flags(es.platform.default_cpu_devices())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--picture", default="docs/deblur-ct.png")
    args = parser.parse_args()
    main(size=args.size, steps=args.steps, picture=args.picture)

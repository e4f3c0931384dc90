"""Generate scico_operators.npz: SCICO 0.0.7's operator numbers on fixed inputs.

Runs ONLY in a scratch environment with SCICO 0.0.7 (never in the test suite):

    /tmp/scico_venv/bin/python tests/data/make_scico_operators.py

The tests (tests/test_operators.py) compare eqx_steps.operators with these.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from scico import linop
from scico.flax.inverse import cg_solver, power_iteration
from scico.linop.xray import XRayTransform2D


def gaussian_psf(size: int = 5, sigma: float = 1.0) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    psf = np.outer(g, g)
    return (psf / psf.sum()).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(0)
    out = {}
    psf = gaussian_psf()
    x = rng.standard_normal((16, 12)).astype(np.float32)
    y = rng.standard_normal((16, 12)).astype(np.float32)
    A = linop.CircularConvolve(h=jnp.asarray(psf), input_shape=(16, 12))
    out.update(conv_psf=psf, conv_x=x, conv_y=y, conv_Ax=A(x), conv_ATy=A.adj(y))
    # Power iteration as ODP's deconvolution block runs it, for the 32x32 blur.
    B = linop.CircularConvolve(h=jnp.asarray(psf), input_shape=(32, 32))
    out["norm_mu_gauss32"] = np.asarray(power_iteration(B.H @ B)[0])
    U = linop.CircularConvolve(h=jnp.ones((3, 3)) / 9.0, input_shape=(32, 32))
    out["norm_mu_uniform32"] = np.asarray(power_iteration(U.H @ U)[0])
    # CG on (A^T A + 0.5 I) x = b, 5 iterations, from zero.
    b = rng.standard_normal((16, 12)).astype(np.float32)
    out["cg_b"] = b
    out["cg_x5"] = np.asarray(
        cg_solver(lambda v: A.adj(A(v)) + 0.5 * v, jnp.asarray(b), maxiter=5)
    )
    # X-ray transform: default geometry, and explicit det_count and dx.
    angles = np.linspace(0, np.pi, 7, endpoint=False).astype(np.float32)
    im = rng.standard_normal((12, 10)).astype(np.float32)
    X = XRayTransform2D((12, 10), angles)
    sino = rng.standard_normal(X.output_shape).astype(np.float32)
    out.update(xray_angles=angles, xray_im=im, xray_Ax=X(im), xray_sino=sino)
    out["xray_ATy"] = X.adj(sino)
    X2 = XRayTransform2D((12, 10), angles, det_count=20, dx=0.6)
    out["xray2_Ax"] = X2(im)
    sino2 = rng.standard_normal(X2.output_shape).astype(np.float32)
    out.update(xray2_sino=sino2, xray2_ATy=X2.adj(sino2))
    out = {k: np.asarray(v) for k, v in out.items()}
    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "scico_operators.npz"
    )
    np.savez_compressed(path, **out)
    print("wrote", path, {k: v.shape for k, v in out.items()})
    print("mu gauss", out["norm_mu_gauss32"], "mu uniform", out["norm_mu_uniform32"])


if __name__ == "__main__":
    print(jax.__version__)
    main()

"""eqx_steps.operators: adjoints, linearity, SCICO's numbers, errors."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eqx_steps import operators


DATA = np.load(os.path.join(os.path.dirname(__file__), "data", "scico_operators.npz"))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@eqx.filter_jit
def _adjoint_gap(op, x, y):
    """`<A x, y> - <x, A^T y>`, relative to the size of the terms."""
    lhs = jnp.vdot(op(x), y)
    rhs = jnp.vdot(x, op.adj(y))
    scale = jnp.linalg.norm(op(x)) * jnp.linalg.norm(y) + 1e-30
    return jnp.abs(lhs - rhs) / scale


@eqx.filter_jit
def _linearity_gap(op, x, z, a, b):
    lhs = op(a * x + b * z)
    rhs = a * op(x) + b * op(z)
    return jnp.max(jnp.abs(lhs - rhs)) / (jnp.max(jnp.abs(rhs)) + 1e-30)


# ---------------------------------------------------------------- SCICO's numbers


def test_circular_convolve_matches_scico():
    op = operators.CircularConvolve(DATA["conv_psf"], (16, 12))
    assert op.input_shape == op.output_shape == (16, 12)
    assert _rel(op(DATA["conv_x"]), DATA["conv_Ax"]) < 1e-5
    assert _rel(op.adj(DATA["conv_y"]), DATA["conv_ATy"]) < 1e-5


def test_circular_convolve_origin_is_the_corner():
    """SCICO's convention: a delta at psf[0, 0] is the identity, not a shift."""
    psf = jnp.zeros((3, 3)).at[0, 0].set(1.0)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 8))
    op = operators.CircularConvolve(psf, (8, 8))
    np.testing.assert_allclose(op(x), x, atol=1e-6)
    shift = operators.CircularConvolve(jnp.zeros((3, 3)).at[1, 2].set(1.0), (8, 8))
    np.testing.assert_allclose(shift(x), jnp.roll(x, (1, 2), axis=(0, 1)), atol=1e-6)


def test_power_iteration_matches_scico():
    """ODP uses the estimate (0.996 for a blur of exact norm 1), not the norm.

    To 1e-5, as the other SCICO figures: 101 float32 FFT products round by the
    CPU's vector width (1.5e-6 apart on an AVX-512 machine)."""
    gauss = operators.CircularConvolve(DATA["conv_psf"], (32, 32))
    mu, _ = operators.power_iteration(gauss)
    assert _rel(mu, DATA["norm_mu_gauss32"]) < 1e-5
    assert 0.99 < float(mu) < 0.999
    uniform = operators.CircularConvolve(jnp.ones((3, 3)) / 9.0, (32, 32))
    mu, _ = operators.power_iteration(uniform)
    assert _rel(mu, DATA["norm_mu_uniform32"]) < 1e-5
    assert operators.operator_norm(uniform) == pytest.approx(
        float(np.sqrt(DATA["norm_mu_uniform32"])), rel=1e-5
    )


def test_cg_solve_matches_scico():
    op = operators.CircularConvolve(DATA["conv_psf"], (16, 12))
    x = operators.cg_solve(lambda v: op.gram(v) + 0.5 * v, jnp.asarray(DATA["cg_b"]), 5)
    assert _rel(x, DATA["cg_x5"]) < 1e-5


def test_cg_solve_zero_rhs_gives_zero_and_finite_gradients():
    """SCICO's 0/0 gives NaN here; eqx_steps gives 0 (a documented difference)."""
    op = operators.CircularConvolve(DATA["conv_psf"], (16, 12))

    def solve(lmbda, b):
        return operators.cg_solve(lambda v: op.gram(v) + lmbda * v, b, 4)

    zero = jnp.zeros((16, 12))
    assert np.all(np.asarray(solve(0.5, zero)) == 0)
    grad = jax.grad(lambda lm: jnp.sum(solve(lm, zero)))(0.5)
    assert np.isfinite(grad)
    # A real solve: the gradient goes through every iteration and is finite.
    b = jnp.asarray(DATA["cg_b"])
    grad = jax.grad(lambda lm: jnp.sum(solve(lm, b) ** 2))(0.5)
    assert np.isfinite(grad) and grad != 0


@pytest.mark.parametrize(
    "kwargs, fwd, sino, adj",
    [
        ({}, "xray_Ax", "xray_sino", "xray_ATy"),
        ({"det_count": 20, "dx": 0.6}, "xray2_Ax", "xray2_sino", "xray2_ATy"),
    ],
)
def test_xray_transform_matches_scico(kwargs, fwd, sino, adj):
    op = operators.XRayTransform2D((12, 10), DATA["xray_angles"], **kwargs)
    assert op.output_shape == DATA[fwd].shape
    assert _rel(op(DATA["xray_im"]), DATA[fwd]) < 1e-5
    assert _rel(op.adj(DATA[sino]), DATA[adj]) < 1e-5


def test_xray_transform_is_differentiable():
    op = operators.XRayTransform2D((12, 10), DATA["xray_angles"])
    im = jnp.asarray(DATA["xray_im"])
    target = jnp.asarray(DATA["xray_Ax"])
    grad = jax.grad(lambda x: jnp.sum((op(x) - 0.5 * target) ** 2))(im)
    # d/dx ||A x - t||^2 = 2 A^T (A x - t)
    np.testing.assert_allclose(grad, 2 * op.adj(op(im) - 0.5 * target), rtol=1e-4)


# ---------------------------------------------------------------- properties


@given(
    shape=st.sampled_from([(8, 8), (9, 6)]),
    ksize=st.sampled_from([(1, 1), (3, 2), (5, 5)]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=8)
def test_circular_convolve_adjoint_identity(shape, ksize, seed):
    ksize = (min(ksize[0], shape[0]), min(ksize[1], shape[1]))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    op = operators.CircularConvolve(jax.random.normal(k1, ksize), shape)
    x, y = jax.random.normal(k2, shape), jax.random.normal(k3, shape)
    assert float(_adjoint_gap(op, x, y)) < 1e-5
    assert float(_linearity_gap(op, x, y, 1.5, -0.25)) < 1e-5


@given(
    shape=st.sampled_from([(8, 8), (10, 7)]),
    n_angles=st.sampled_from([3, 5]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=4)
def test_xray_adjoint_identity(shape, n_angles, seed):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    angles = jax.random.uniform(k1, (n_angles,), maxval=np.pi)
    op = operators.XRayTransform2D(shape, angles)
    x, y = jax.random.normal(k2, shape), jax.random.normal(k3, op.output_shape)
    assert float(_adjoint_gap(op, x, y)) < 1e-5
    assert float(_linearity_gap(op, x, x[::-1], 2.0, 0.5)) < 1e-5


@given(seed=st.integers(0, 2**16))
@settings(max_examples=5)
def test_function_operator_default_adjoint_is_the_transpose(seed):
    """With no adjoint given, `adj` is `jax.linear_transpose` of the map."""
    matrix = jax.random.normal(jax.random.PRNGKey(seed), (5, 3))
    op = operators.FunctionOperator(lambda v: matrix @ v, (3,), (5,))
    y = jnp.arange(5.0)
    np.testing.assert_allclose(op.adj(y), matrix.T @ y, rtol=1e-5, atol=1e-5)
    x = jnp.arange(3.0)
    assert float(_adjoint_gap(op, x, y)) < 1e-5


def test_operators_are_pytrees_with_array_leaves():
    """The PSF is a leaf (traced by jit, vmapped over), the shapes are static."""
    op = operators.CircularConvolve(DATA["conv_psf"], (16, 12))
    leaves = jax.tree_util.tree_leaves(op)
    assert len(leaves) == 1 and leaves[0].shape == (5, 5)
    batch = jnp.stack([jnp.asarray(DATA["conv_x"])] * 3)
    out = jax.vmap(op)(batch)
    np.testing.assert_allclose(out[2], op(DATA["conv_x"]), rtol=1e-6)
    doubled = jax.jit(lambda o, x: o(x))(
        eqx.tree_at(lambda o: o.psf, op, 2 * op.psf), batch[0]
    )
    np.testing.assert_allclose(doubled, 2 * op(batch[0]), rtol=1e-5, atol=1e-6)


class _ScicoLike:
    """An object shaped like SCICO's LinearOperator, built on a callback."""

    input_shape = (4, 3)
    output_shape = (4, 3)
    input_dtype = np.float32

    def __call__(self, x):
        return jax.pure_callback(
            lambda v: np.asarray(v)[::-1] * 2, jax.ShapeDtypeStruct((4, 3), x.dtype), x
        )

    def adj(self, y):
        return jax.pure_callback(
            lambda v: np.asarray(v)[::-1] * 2, jax.ShapeDtypeStruct((4, 3), y.dtype), y
        )


def test_from_linear_operator_uses_the_objects_adjoint():
    op = operators.from_linear_operator(_ScicoLike())
    assert (op.input_shape, op.output_shape) == ((4, 3), (4, 3))
    x = jnp.arange(12.0).reshape(4, 3)
    np.testing.assert_allclose(op(x), 2 * x[::-1])
    np.testing.assert_allclose(jax.jit(op.adj)(x), 2 * x[::-1])
    assert float(_adjoint_gap(op, x, x + 1)) < 1e-6


# ---------------------------------------------------------------- errors


def test_psf_larger_than_image_is_an_error():
    with pytest.raises(ValueError, match="`psf` of shape \\(9, 3\\) is larger"):
        operators.CircularConvolve(jnp.ones((9, 3)), (8, 8))
    with pytest.raises(ValueError, match="`psf` has shape \\(3,\\)"):
        operators.CircularConvolve(jnp.ones(3), (8, 8))


def test_function_operator_output_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="not to `output_shape` = \\(4,\\)"):
        operators.FunctionOperator(lambda v: v, (3,), (4,))


def test_no_adjoint_and_no_transpose_rule_is_an_error():
    def fn(x):
        return jax.pure_callback(np.negative, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    op = operators.FunctionOperator(fn, (3,), (3,))
    np.testing.assert_allclose(op(jnp.ones(3)), -np.ones(3))
    with pytest.raises(TypeError, match="has no explicit adjoint.*adjoint=adj_fn"):
        op.adj(jnp.ones(3))
    with_adj = operators.FunctionOperator(fn, (3,), (3,), adjoint=fn)
    np.testing.assert_allclose(with_adj.adj(jnp.ones(3)), -np.ones(3))


def test_wrong_input_shape_is_an_error():
    op = operators.CircularConvolve(jnp.ones((3, 3)), (8, 8))
    with pytest.raises(ValueError, match="`x` has shape \\(2, 8, 8\\).*jax.vmap"):
        op(jnp.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="`y` has shape"):
        op.adj(jnp.ones((8, 7)))


def test_not_an_operator_is_an_error():
    with pytest.raises(TypeError, match="has no 'adj'"):
        operators.from_linear_operator(lambda x: x)
    with pytest.raises(TypeError, match="from_linear_operator"):
        operators.power_iteration(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`angles`"):
        operators.XRayTransform2D((8, 8), [[0.0, 1.0]])

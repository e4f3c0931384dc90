"""Tests of the losses and metrics: `mse_loss`, `snr`, `psnr` and `compute_metrics`
against SCICO's formulas; `cross_entropy_loss` and `classification_metrics` against
optax and numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import eqx_steps as es
from eqx_steps import compute_metrics, mse_loss, psnr, snr


SHAPES = [(7,), (4, 5), (2, 6, 6, 1)]


def _pair(shape, seed, noise=0.3):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=shape).astype(np.float32)
    cmp = (ref + noise * rng.normal(size=shape)).astype(np.float32)
    return ref, cmp


# SCICO 0.0.7 formulas (scico.metric), in float64 numpy.
def _scico_mse(ref, cmp):
    return np.mean(np.abs(np.float64(ref) - np.float64(cmp)) ** 2)


def _scico_snr(ref, cmp):
    return 10.0 * np.log10(np.var(np.float64(ref)) / _scico_mse(ref, cmp))


def _scico_psnr(ref, cmp, signal_range=None):
    if signal_range is None:
        signal_range = abs(np.max(np.float64(ref)) - np.min(np.float64(ref)))
    return 10.0 * np.log10(signal_range**2 / _scico_mse(ref, cmp))


_jit_metrics = jax.jit(compute_metrics)


@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1))
def test_mse_loss_is_half_mean_squared_error(shape, seed):
    output, labels = _pair(shape, seed)
    expected = 0.5 * np.mean((np.float64(output) - np.float64(labels)) ** 2)
    got = mse_loss(output, labels)
    assert got.shape == ()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mse_loss_known_value():
    assert float(mse_loss(jnp.array([1.0, 3.0]), jnp.array([0.0, 0.0]))) == 2.5


@given(
    shape=st.sampled_from(SHAPES),
    seed=st.integers(0, 2**31 - 1),
    noise=st.sampled_from([1e-2, 0.3, 3.0]),
)
def test_snr_psnr_match_scico_formula(shape, seed, noise):
    ref, cmp = _pair(shape, seed, noise)
    np.testing.assert_allclose(snr(ref, cmp), _scico_snr(ref, cmp), rtol=1e-4)
    np.testing.assert_allclose(psnr(ref, cmp), _scico_psnr(ref, cmp), rtol=1e-4)
    np.testing.assert_allclose(
        psnr(ref, cmp, signal_range=255), _scico_psnr(ref, cmp, 255), rtol=1e-4
    )


@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([-3.0, 0.25, 10.0]),
    offset=st.sampled_from([0.0, -1.5, 7.0]),
)
def test_snr_psnr_invariant_to_common_affine_change(seed, scale, offset):
    # var(reference) and the error both scale by scale**2; the offset cancels.
    # PSNR with the default (actual) range scales the same way.
    ref, cmp = _pair((4, 5), seed)
    ref2, cmp2 = scale * ref + offset, scale * cmp + offset
    np.testing.assert_allclose(snr(ref2, cmp2), snr(ref, cmp), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(psnr(ref2, cmp2), psnr(ref, cmp), rtol=1e-4, atol=1e-4)


def test_snr_psnr_known_values():
    ref = jnp.array([1.0, -1.0, 1.0, -1.0])  # variance 1
    cmp = ref + 0.1  # error 0.01
    np.testing.assert_allclose(snr(ref, cmp), 20.0, rtol=1e-5)
    # range of ref is 2: 10 log10(4 / 0.01)
    np.testing.assert_allclose(psnr(ref, cmp), 10 * math.log10(400.0), rtol=1e-5)
    np.testing.assert_allclose(psnr(ref, cmp, signal_range=1.0), 20.0, rtol=1e-5)
    # a worse estimate has a lower SNR
    assert snr(ref, ref + 0.2) < snr(ref, cmp)


def test_snr_of_identical_signals_is_inf_as_in_scico():
    ref = jnp.arange(6.0)
    assert snr(ref, ref) == jnp.inf
    assert psnr(ref, ref) == jnp.inf
    # constant reference equal to the comparison: 0 / 0
    assert jnp.isnan(snr(jnp.ones(3), jnp.ones(3)))


def test_snr_is_over_the_whole_batch_not_per_example():
    ref, cmp = _pair((3, 4, 4, 1), 0)
    per_example = np.mean([_scico_snr(r, c) for r, c in zip(ref, cmp)])
    np.testing.assert_allclose(snr(ref, cmp), _scico_snr(ref, cmp), rtol=1e-4)
    assert not np.isclose(float(snr(ref, cmp)), per_example, rtol=1e-4)


def test_compute_metrics_keys_and_values():
    labels, output = _pair((2, 6, 6, 1), 1)
    metrics = compute_metrics(output, labels)
    assert set(metrics) == {"loss", "snr"}
    np.testing.assert_allclose(metrics["loss"], mse_loss(output, labels), rtol=1e-6)
    # SNR of the output with respect to the labels (the reference)
    np.testing.assert_allclose(metrics["snr"], _scico_snr(labels, output), rtol=1e-4)
    # pure and per device: works under jit with no axis name bound
    jitted = _jit_metrics(output, labels)
    for k in metrics:
        np.testing.assert_allclose(jitted[k], metrics[k], rtol=1e-6)
        assert jitted[k].shape == ()


def test_compute_metrics_uses_the_criterion():
    labels, output = _pair((5,), 2)

    def l1(o, t):
        return jnp.mean(jnp.abs(o - t))

    metrics = compute_metrics(output, labels, l1)
    np.testing.assert_allclose(
        metrics["loss"], np.mean(np.abs(output - labels)), rtol=1e-6
    )
    metrics = compute_metrics(output, labels, criterion=l1)
    np.testing.assert_allclose(
        metrics["loss"], np.mean(np.abs(output - labels)), rtol=1e-6
    )


@pytest.mark.parametrize(
    "fn, names",
    [
        (mse_loss, ("output", "labels")),
        (snr, ("reference", "comparison")),
        (psnr, ("reference", "comparison")),
    ],
)
def test_shape_mismatch_raises(fn, names):
    with pytest.raises(
        ValueError, match=rf"`{names[0]}` has shape \(3,\).*`{names[1]}`"
    ):
        fn(jnp.zeros(3), jnp.zeros((3, 1)))


# ---------------------------------------------------------------------------
# Classification: cross-entropy with integer labels, accuracy.

# (logits shape); the labels have logits.shape[:-1].
LOGIT_SHAPES = [(1, 2), (5, 3), (8, 10), (2, 3, 4)]


def _logits_labels(shape, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=shape)).astype(np.float32)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    return logits, labels


def _np_cross_entropy(logits, labels):
    z = np.float64(logits)
    m = z.max(-1, keepdims=True)
    log_softmax = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_softmax, labels[..., None], -1)[..., 0]
    return -picked.mean()


_jit_classification = jax.jit(es.classification_metrics)


@given(
    shape=st.sampled_from(LOGIT_SHAPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.1, 3.0, 100.0]),
)
def test_cross_entropy_matches_numpy_and_optax(shape, seed, scale):
    logits, labels = _logits_labels(shape, seed, scale)
    got = es.cross_entropy_loss(logits, labels)
    assert got.shape == () and np.isfinite(float(got))
    np.testing.assert_allclose(got, _np_cross_entropy(logits, labels), rtol=1e-5)
    optax_mean = np.mean(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    )
    np.testing.assert_allclose(got, optax_mean, rtol=1e-6)


@given(shape=st.sampled_from(LOGIT_SHAPES), seed=st.integers(0, 2**31 - 1))
def test_classification_metrics_match_numpy(shape, seed):
    logits, labels = _logits_labels(shape, seed)
    metrics = _jit_classification(logits, labels)
    assert set(metrics) == {"loss", "accuracy"}
    accuracy = float(metrics["accuracy"])
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-6)
    np.testing.assert_allclose(
        metrics["loss"], _np_cross_entropy(logits, labels), rtol=1e-5
    )


def test_accuracy_known_values_and_criterion():
    labels = jnp.array([0, 2, 1, 1])
    perfect = 5.0 * jax.nn.one_hot(labels, 3)
    assert float(es.classification_metrics(perfect, labels)["accuracy"]) == 1.0
    wrong = 5.0 * jax.nn.one_hot((labels + 1) % 3, 3)
    assert float(es.classification_metrics(wrong, labels)["accuracy"]) == 0.0
    half = perfect.at[:2].set(wrong[:2])
    assert float(es.classification_metrics(half, labels)["accuracy"]) == 0.5

    def zero(o, t):
        return jnp.zeros(())

    assert float(es.classification_metrics(perfect, labels, zero)["loss"]) == 0.0


@pytest.mark.parametrize(
    "fn", [es.cross_entropy_loss, es.classification_metrics], ids=lambda f: f.__name__
)
def test_classification_bad_labels_raise(fn):
    logits = jnp.zeros((4, 3))
    with pytest.raises(TypeError, match=r"`labels` must hold integer.*float32"):
        fn(logits, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"\(4, 3\).*`labels` has shape \(4, 1\)"):
        fn(logits, jnp.zeros((4, 1), jnp.int32))

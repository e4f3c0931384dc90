"""Tests of `eqx_steps.denoise`: whole-image denoising, tiled, and noisy test images."""

import equinox as eqx
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import eqx_steps as es
from eqx_steps.denoise import add_noise, denoise_image
from eqx_steps.models import load_scico_dncnn


MODEL, STATE = load_scico_dncnn("6M")  # 6 layers: receptive-field radius 6
NOISE_MODEL, NOISE_STATE = load_scico_dncnn("6N")
RNG = np.random.default_rng(0)
IMAGE = RNG.uniform(size=(40, 50, 3)).astype(np.float32)


@eqx.filter_jit
def direct(model, state, x):
    """The model on one whole example, as the issue defines denoising."""
    return eqx.nn.inference_mode(model)(x, state)[0]


def smooth_image(h=64, w=64):
    i, j = np.mgrid[:h, :w]
    return (0.5 + 0.3 * np.sin(i / 7) * np.cos(j / 9)).astype(np.float32)


# ---------------------------------------------------------------------------
# Tiling gives the untiled result; only tiles reach the model.


@settings(max_examples=4)
@given(
    shape=st.sampled_from([(40, 50), (17, 33), (40, 9)]),
    tile=st.sampled_from([8, 16, 20]),
)
@pytest.mark.slow
def test_tiled_equals_untiled(shape, tile):
    image = IMAGE[: shape[0], : shape[1], 0]
    whole = denoise_image(MODEL, STATE, image, tile=None)
    np.testing.assert_allclose(whole, direct(MODEL, STATE, image[..., None])[..., 0])
    tiled = denoise_image(MODEL, STATE, image, tile=tile)
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-6)


def test_too_little_overlap_is_visible():
    image = IMAGE[..., 0]
    whole = denoise_image(MODEL, STATE, image, tile=None)
    tiled = denoise_image(MODEL, STATE, image, tile=16, overlap=1)
    assert not np.allclose(tiled, whole, atol=1e-3)


def test_the_model_sees_only_tiles_of_one_shape():
    seen = set()

    def recording(model, state, x, **kwargs):
        seen.add(x.shape)  # at trace time: once per shape
        return es.per_example(model, state, x, **kwargs)

    image = IMAGE[..., 0]
    out = denoise_image(MODEL, STATE, image, tile=16, forward=recording)
    assert seen == {(1, 16 + 2 * 6, 16 + 2 * 6, 1)}
    np.testing.assert_allclose(out, denoise_image(MODEL, STATE, image), atol=1e-6)
    seen.clear()
    denoise_image(MODEL, STATE, image[:10], tile=16, forward=recording)
    assert seen == {(1, 10, 28, 1)}  # an axis no longer than a tile is not cut


# ---------------------------------------------------------------------------
# Channels: whole, each on its own, with a noise-level plane.


def test_colour_each_channel_on_its_own():
    out = denoise_image(MODEL, STATE, IMAGE, tile=24)
    assert out.shape == IMAGE.shape and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(
            out[..., c], denoise_image(MODEL, STATE, IMAGE[..., c]), atol=1e-6
        )


class Reverse(eqx.Module):
    """A stateless colour 'model': reverses the channels."""

    channels: int = 3

    def __call__(self, x):
        return x[..., ::-1]


def test_a_colour_model_gets_the_whole_image():
    out = denoise_image(Reverse(), None, IMAGE, tile=16)
    np.testing.assert_array_equal(out, IMAGE[..., ::-1])


@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 3)])
def test_noise_level_model(shape):
    image = IMAGE[..., 0] if len(shape) == 2 else IMAGE
    out = denoise_image(NOISE_MODEL, NOISE_STATE, image, sigma=0.1, tile=16)
    assert out.shape == shape
    planes = image[..., None] if image.ndim == 2 else image
    for c in range(planes.shape[-1]):
        x = np.stack([planes[..., c], np.full(shape[:2], 0.1, np.float32)], -1)
        expected = direct(NOISE_MODEL, NOISE_STATE, x)[..., 0]
        got = out if image.ndim == 2 else out[..., c]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


class Halve(eqx.Module):
    """A stateless one-channel 'denoiser'."""

    channels: int = 1

    def __call__(self, x):
        return x / 2


def test_stateless_model_and_dtype():
    out = denoise_image(Halve(), None, IMAGE[..., 0].astype(np.float64), tile=16)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, IMAGE[..., 0] / 2)


def test_denoising_a_noisy_image_raises_its_snr():
    clean = smooth_image()
    noisy = add_noise(clean, 0.1, seed=3)
    denoised = denoise_image(MODEL, STATE, noisy, tile=32)
    assert float(es.snr(clean, denoised)) > float(es.snr(clean, noisy)) + 3


# ---------------------------------------------------------------------------
# add_noise.


def test_add_noise_is_seeded():
    clean = smooth_image(128, 128)
    a, b, c = (add_noise(clean, 0.1, seed=s) for s in (1, 1, 2))
    assert a.shape == clean.shape and a.dtype == clean.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert abs(float(np.std(a - clean)) - 0.1) < 0.005
    np.testing.assert_array_equal(add_noise(clean, 0, seed=1), clean)


# ---------------------------------------------------------------------------
# Errors name the argument, the value and the fix.


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image": IMAGE.astype(np.uint8)}, TypeError, "image.*uint8.*/ 255"),
        ({"image": IMAGE[None]}, ValueError, r"image.*\(1, 40, 50, 3\)"),
        ({"model": Reverse(4)}, ValueError, "takes 4 channels but `image` has 3"),
        ({"sigma": 0.1}, ValueError, "sigma.*takes 1 channel.*leave `sigma` out"),
        ({"sigma": -1.0}, ValueError, "sigma.*>= 0"),
        ({"tile": 0}, ValueError, "tile.*>= 1"),
        ({"tile": 1.5}, TypeError, "tile.*int"),
        ({"overlap": -1}, ValueError, "overlap.*>= 0"),
        ({"model": object()}, TypeError, "model.*channels"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"model": MODEL, "model_state": STATE, "image": IMAGE}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        denoise_image(**args)


def test_noise_level_model_without_sigma():
    with pytest.raises(ValueError, match="takes 2 channels.*give `sigma`"):
        denoise_image(NOISE_MODEL, NOISE_STATE, IMAGE[..., 0])


@pytest.mark.parametrize(
    "sigma, seed, error",
    [(-0.1, 0, ValueError), ("0.1", 0, TypeError), (0.1, -1, ValueError)],
)
def test_add_noise_bad_arguments(sigma, seed, error):
    with pytest.raises(error, match="sigma|seed"):
        add_noise(IMAGE, sigma, seed)

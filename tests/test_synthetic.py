"""Tests of the synthetic denoising data."""

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from eqx_steps.synthetic import make_denoising_data, make_phantoms


@settings(max_examples=15)
@given(
    n_train=st.integers(1, 9),
    n_test=st.integers(1, 5),
    size=st.integers(1, 24),
    channels=st.integers(1, 3),
    seed=st.integers(0, 2**32),
)
def test_shapes_dtypes_and_range(n_train, n_test, size, channels, seed):
    train, test = make_denoising_data(
        n_train, n_test, size=size, channels=channels, seed=seed
    )
    for ds, n in ((train, n_train), (test, n_test)):
        assert set(ds) == {"image", "label"}
        for array in ds.values():
            assert isinstance(array, np.ndarray)
            assert array.shape == (n, size, size, channels)
            assert array.dtype == np.float32
            assert np.all(np.isfinite(array))
        assert ds["label"].min() >= 0.0 and ds["label"].max() <= 1.0


def test_phantoms_have_structure():
    clean = make_phantoms(256, size=32, seed=1)
    assert clean.min() >= 0.0
    assert clean.max() <= 1.0
    # Varied images, each with several distinct regions.
    assert clean.std() > 0.15
    assert np.std(clean.mean(axis=(1, 2, 3))) > 0.05
    per_image_std = clean.std(axis=(1, 2, 3))
    assert np.mean(per_image_std > 0.02) > 0.9
    # Channels differ (ellipses have a colour per channel).
    rgb = make_phantoms(16, size=16, channels=3, seed=1)
    assert not np.allclose(rgb[..., 0], rgb[..., 1])


@settings(max_examples=5)
@given(seed=st.integers(0, 1000), noise_std=st.sampled_from([0.05, 0.1, 0.5]))
def test_deterministic_by_seed(seed, noise_std):
    a = make_denoising_data(5, 3, size=8, noise_std=noise_std, seed=seed)
    b = make_denoising_data(5, 3, size=8, noise_std=noise_std, seed=seed)
    c = make_denoising_data(5, 3, size=8, noise_std=noise_std, seed=seed + 1)
    for ds_a, ds_b, ds_c in zip(a, b, c):
        for key in ("image", "label"):
            np.testing.assert_array_equal(ds_a[key], ds_b[key])
            assert not np.array_equal(ds_a[key], ds_c[key])


@settings(max_examples=5)
@given(noise_std=st.floats(0.01, 1.0))
def test_noise_std_close_to_requested(noise_std):
    train, test = make_denoising_data(64, 64, size=32, noise_std=noise_std, seed=3)
    for ds in (train, test):
        noise = ds["image"] - ds["label"]  # 65536 samples
        assert abs(noise.std() / noise_std - 1) < 0.02
        assert abs(noise.mean()) < 4 * noise_std / math.sqrt(noise.size)


def test_zero_noise():
    train, test = make_denoising_data(4, 2, size=8, noise_std=0.0)
    np.testing.assert_array_equal(train["image"], train["label"])
    np.testing.assert_array_equal(test["image"], test["label"])


def test_train_and_test_are_disjoint():
    train, test = make_denoising_data(256, 64, size=16, seed=0)
    train_rows = {row.tobytes() for row in train["label"]}
    assert not any(row.tobytes() in train_rows for row in test["label"])
    assert not np.array_equal(train["image"][:64], test["image"])


def test_prefix_stable():
    # More examples extend fewer; the test set does not depend on n_train.
    small_train, small_test = make_denoising_data(3, 2, size=8, seed=5)
    big_train, big_test = make_denoising_data(10, 2, size=8, seed=5)
    for key in ("image", "label"):
        np.testing.assert_array_equal(big_train[key][:3], small_train[key])
        np.testing.assert_array_equal(big_test[key], small_test[key])
    np.testing.assert_array_equal(
        make_phantoms(7, seed=2)[:4], make_phantoms(4, seed=2)
    )


def test_large_requests_are_chunked_consistently():
    # Rendering in chunks (bounded memory) gives the same images as one pass.
    import eqx_steps.synthetic as synthetic

    whole = make_phantoms(40, size=16, seed=4)
    old = synthetic._CHUNK_PIXELS
    try:
        synthetic._CHUNK_PIXELS = 16 * 16 * 7
        chunked = make_phantoms(40, size=16, seed=4)
    finally:
        synthetic._CHUNK_PIXELS = old
    np.testing.assert_array_equal(whole, chunked)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_train=0), r"`n_train` must be an integer >= 1, got 0"),
        (dict(n_test=-2), r"`n_test` must be an integer >= 1, got -2"),
        (dict(n_train=2.5), r"`n_train` must be an integer >= 1, got 2.5"),
        (dict(n_train=True), r"`n_train` must be an integer >= 1, got True"),
        (dict(size=0), r"`size` must be an integer >= 1, got 0"),
        (dict(channels=0), r"`channels` must be an integer >= 1, got 0"),
        (dict(noise_std=-0.1), r"`noise_std` must be a finite number >= 0, got -0.1"),
        (dict(noise_std=float("nan")), r"`noise_std` must be .*, got nan"),
        (dict(noise_std="0.1"), r"`noise_std` must be .*, got '0.1'"),
        (dict(seed=-1), r"`seed` must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = dict(n_train=4, n_test=2) | kwargs
    n_train, n_test = args.pop("n_train"), args.pop("n_test")
    with pytest.raises(ValueError, match=message):
        make_denoising_data(n_train, n_test, **args)


def test_numpy_integers_are_accepted():
    train, _ = make_denoising_data(np.int64(3), 2, size=np.int32(8), seed=np.uint8(1))
    assert train["image"].shape == (3, 8, 8, 1)

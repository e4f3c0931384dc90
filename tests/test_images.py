"""Image files in and out (`eqx_steps.images`), and random patches."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from eqx_steps import images
from eqx_steps.synthetic import make_phantoms


def _rgb(h=20, w=30, seed=0) -> np.ndarray:
    return make_phantoms(1, size=max(h, w), channels=3, seed=seed)[0, :h, :w]


def test_png_round_trip_is_8_bit_exact(tmp_path):
    image = _rgb()
    images.write_image(tmp_path / "a.png", image)
    back = images.read_image(tmp_path / "a.png")
    assert back.shape == (20, 30, 3) and back.dtype == np.float32
    np.testing.assert_allclose(back, image, atol=0.5 / 255 + 1e-6)
    gray = image[..., :1]
    images.write_image(tmp_path / "g.tif", gray)
    assert images.read_image(tmp_path / "g.tif").shape == (20, 30, 1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize(
    "mode, pixels, channels, peak",
    [
        ("L", np.full((4, 5), 51, np.uint8), 1, 51 / 255),
        ("I;16", np.full((4, 5), 13107, np.uint16), 1, 0.2),
        ("RGBA", np.full((4, 5, 4), 102, np.uint8), 3, 0.4),
        ("LA", np.full((4, 5, 2), 255, np.uint8), 1, 1.0),
        ("F", np.full((4, 5), 0.25, np.float32), 1, 0.25),
    ],
)
def test_modes_become_unit_range_channels(tmp_path, mode, pixels, channels, peak):
    path = tmp_path / ("x.tif" if mode == "F" else "x.png")
    Image.fromarray(pixels).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
    image = images.read_image(path)
    assert image.shape == (4, 5, channels)
    np.testing.assert_allclose(image, peak, rtol=1e-6)


def test_palette_image_is_read_as_rgb(tmp_path):
    Image.fromarray((_rgb() * 255).astype(np.uint8)).convert("P").save(
        tmp_path / "p.png"
    )
    assert images.read_image(tmp_path / "p.png").shape == (20, 30, 3)


def test_folder_in_name_order_mixed_channels_become_rgb(tmp_path):
    images.write_image(tmp_path / "b.png", _rgb(seed=1))
    images.write_image(tmp_path / "a.jpg", _rgb(seed=2)[..., :1])
    (tmp_path / "notes.txt").write_text("not an image")
    got = images.read_images(tmp_path)
    assert [name.rsplit("/", 1)[-1] for name, _ in got] == ["a.jpg", "b.png"]
    assert all(im.shape == (20, 30, 3) for _, im in got)
    gray = got[0][1]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize(
    "shape, count, channels",
    [((6, 7), 1, 1), ((6, 7, 3), 1, 3), ((2, 6, 7), 2, 1), ((2, 6, 7, 1), 2, 1)],
)
def test_arrays(tmp_path, shape, count, channels):
    array = np.random.default_rng(0).random(shape, dtype=np.float32)
    np.save(tmp_path / "a.npy", array)
    np.savez(tmp_path / "b.npz", images=array, other=np.zeros(3))
    for name in ("a.npy", "b.npz"):
        got = images.read_images(tmp_path / name)
        assert len(got) == count and got[0][1].shape == (6, 7, channels)
        np.testing.assert_array_equal(got[0][1].ravel(), array.reshape(count, -1)[0])
    np.save(tmp_path / "u.npy", np.full(shape, 255, np.uint8))
    assert images.read_images(tmp_path / "u.npy")[0][1].max() == 1.0


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda p: p.mkdir(), ValueError, "holds no image files"),
        (lambda p: p.write_bytes(b"\x89PNG not really"), ValueError, "cannot read"),
        (lambda p: None, FileNotFoundError, "does not exist"),
        (lambda p: np.save(p, np.zeros((2, 3, 4, 5))), ValueError, "not a stack"),
        (
            lambda p: np.savez(p, a=np.zeros((4, 4)), b=np.zeros((4, 4))),
            ValueError,
            "name the images 'images'",
        ),
        (lambda p: np.save(p, np.full((4, 4), np.nan)), ValueError, "non-finite"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, make, error, words):
    suffix = {"not a stack": ".npy", "non-finite": ".npy"}.get(words, ".png")
    if "images" in words:
        suffix = ".npz"
    path = tmp_path / ("thing" + suffix)
    make(path)
    with pytest.raises(error, match=words) as info:
        images.read_images(path)
    assert "thing" in str(info.value)


@settings(max_examples=10)
@given(
    shapes=st.lists(st.tuples(st.integers(4, 9), st.integers(4, 9)), min_size=1,
                    max_size=3),
    n=st.integers(1, 12),
    size=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_patches_are_windows_of_the_images(shapes, n, size, seed):
    rng = np.random.default_rng(seed)
    ims = [rng.random((h, w, 2), dtype=np.float32) for h, w in shapes]
    patches = images.random_patches(ims, n, size=size, seed=seed)
    assert patches.shape == (n, size, size, 2)
    np.testing.assert_array_equal(
        patches, images.random_patches(ims, n, size=size, seed=seed)
    )
    windows = [
        im[y : y + size, x : x + size]
        for im in ims
        for y in range(im.shape[0] - size + 1)
        for x in range(im.shape[1] - size + 1)
    ]
    for p in patches:
        assert any(np.array_equal(p, w) for w in windows)


def test_patches_refuse_small_images():
    with pytest.raises(ValueError, match=r"images\[1\]` is 3x8.*at most 3"):
        images.random_patches([np.zeros((8, 8, 1)), np.zeros((3, 8, 1))], 2, size=4)
    with pytest.raises(ValueError, match="empty"):
        images.random_patches([], 2, size=4)


def test_a_picture_that_cannot_be_written_names_the_file_and_the_cause(tmp_path):
    folder = tmp_path / "pic.png"
    folder.mkdir()
    with pytest.raises(OSError, match=r"cannot write '.*pic.png': it is a folder"):
        images.write_image(folder, np.zeros((4, 4)))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(OSError, match=r"'.*blocker' is a file, not a folder"):
        images.write_image(blocker / "sub" / "pic.png", np.zeros((4, 4)))
    assert sorted(os.listdir(tmp_path)) == ["blocker", "pic.png"]  # no leftovers

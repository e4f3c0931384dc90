"""`eqx-steps denoise IMAGE`: SCICO's pretrained DnCNN or a trained run on an image
file, run in-process through `main([...])` on small generated images."""

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest

from eqx_steps import cli, images
from eqx_steps.synthetic import make_phantoms


PNG = b"\x89PNG\r\n\x1a\n"
TINY_RUN = [
    "--depth", "3", "--filters", "8", "--patch", "16", "--train-size", "32",
    "--test-size", "8", "--batch-size", "8", "--epochs", "1", "--lr", "1e-2",
]  # fmt: skip
SNRS = re.compile(r"noisy ([-+\d.]+) dB, denoised ([-+\d.]+) dB \(([-+\d.]+) dB\)")


def _denoise(argv: list[str]) -> str:
    """The printed output of a successful `eqx-steps denoise`."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["denoise", *argv]) == 0
    return buf.getvalue()


def _snrs(text: str) -> tuple[float, float, float]:
    """(noisy, denoised, improvement) from the printed SNR line."""
    m = SNRS.search(text)
    assert m, f"no SNR line in:\n{text}"
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def _exit_code(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(["denoise", *argv])
    return int(info.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """A 48x48 grayscale phantom as a PNG file."""
    path = tmp_path_factory.mktemp("images") / "gray.png"
    images.write_image(path, make_phantoms(1, size=48, seed=3)[0])
    return path


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """A 48x40 colour phantom as a PNG file."""
    path = tmp_path_factory.mktemp("images") / "colour.png"
    images.write_image(path, make_phantoms(1, size=48, channels=3, seed=4)[0, :, :40])
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny grayscale run trained by `eqx-steps train`."""
    out = tmp_path_factory.mktemp("cli") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", *TINY_RUN, "--out", str(out)]) == 0
    return out


def test_pretrained_6l_with_noise_improves_the_snr(gray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _denoise([str(gray), "--variant", "6L", "--noise", "0.1"])
    noisy, denoised, gain = _snrs(text)
    assert denoised > noisy + 3
    assert gain == pytest.approx(denoised - noisy, abs=0.011)
    assert "SCICO's DnCNN 6L" in text and "gray-denoised.png" in text
    # Defaults: both files in the current folder, named after the image.
    out = images.read_image(tmp_path / "gray-denoised.png")
    assert out.shape == (48, 48, 1)
    assert (tmp_path / "gray-denoised-compare.png").read_bytes()[:8] == PNG
    # The written image is the denoised one: closer to the original than the
    # noise level (std 0.1), and not the original itself.
    error = np.std(out - images.read_image(gray))
    assert 0.005 < error < 0.07


def test_the_seed_picks_the_noise(gray, tmp_path):
    argv = [str(gray), "--variant", "6L", "--noise", "0.1", "--out"]
    first = _snrs(_denoise([*argv, str(tmp_path / "a.png"), "--seed", "1"]))
    again = _snrs(_denoise([*argv, str(tmp_path / "b.png"), "--seed", "1"]))
    other = _snrs(_denoise([*argv, str(tmp_path / "c.png"), "--seed", "2"]))
    assert first == again and first[0] != other[0]


def test_colour_each_channel_and_tiles(colour, tmp_path):
    out, whole = tmp_path / "tiled.png", tmp_path / "whole.png"
    argv = [str(colour), "--variant", "6M", "--noise", "0.1"]
    text = _denoise([*argv, "--out", str(out), "--tile", "16"])
    assert "3 channel(s)" in text and "each channel on its own" in text
    assert "tiles of 16x16" in text
    _denoise([*argv, "--out", str(whole), "--tile", "0"])
    tiled = images.read_image(out)
    assert tiled.shape == (48, 40, 3)
    # Tiles with the receptive field as overlap: the untiled result, up to the
    # 8-bit rounding of the files.
    np.testing.assert_allclose(tiled, images.read_image(whole), atol=1.01 / 255)
    assert (tmp_path / "tiled-compare.png").read_bytes()[:8] == PNG


def test_noise_level_model_takes_sigma(gray, tmp_path, capsys):
    out = str(tmp_path / "n.png")
    noisy, denoised, _ = _snrs(
        _denoise([str(gray), "--variant", "6N", "--noise", "0.1", "--out", out])
    )
    assert denoised > noisy + 3
    # Without noise added, the input's noise level must be given.
    _denoise([str(gray), "--variant", "6N", "--sigma", "0.02", "--out", out])
    code, err = _exit_code(capsys, [str(gray), "--variant", "6N", "--out", out])
    assert code == 2 and "--sigma" in err and len(err.strip().splitlines()) == 1


def test_without_noise_writes_input_and_denoised(gray, tmp_path):
    out = tmp_path / "plain.jpg"
    text = _denoise([str(gray), "--variant", "6L", "--out", str(out)])
    assert "SNR" not in text and str(out) in text
    assert images.read_image(out).shape == (48, 48, 1)
    assert (tmp_path / "plain-compare.png").read_bytes()[:8] == PNG


def test_a_trained_run(run_dir, gray, colour, tmp_path):
    out = tmp_path / "run.png"
    text = _denoise(
        [str(gray), "--run", str(run_dir), "--noise", "0.2", "--out", str(out)]
    )
    assert f"dncnn of {run_dir} (step 4)" in text
    noisy, denoised, _ = _snrs(text)
    assert np.isfinite(noisy) and np.isfinite(denoised)
    assert images.read_image(out).shape == (48, 48, 1)
    # A grayscale model on a colour image: each channel on its own.
    text = _denoise([str(colour), "--run", str(run_dir), "--out", str(out)])
    assert "each channel on its own" in text
    assert images.read_image(out).shape == (48, 40, 3)


def _run_copy(run_dir, tmp_path, checkpoints: bool, **config):
    """A copy of the run folder, with or without its checkpoints, `config.json`
    entries replaced by `config`."""
    folder = tmp_path / "copied-run"
    if checkpoints:
        shutil.copytree(run_dir, folder)
    else:
        folder.mkdir()
        shutil.copy(run_dir / "config.json", folder / "config.json")
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, **config}))
    return str(folder)


def _bad_argv(case: str, gray, run_dir, tmp_path) -> list[str]:
    image, model = [str(gray)], ["--variant", "6L"]
    if case == "missing image":
        return [str(tmp_path / "nope.png"), *model]
    if case == "not an image":
        (tmp_path / "junk.png").write_text("not a picture")
        return [str(tmp_path / "junk.png"), *model]
    if case == "run without checkpoint":
        return [*image, "--run", _run_copy(run_dir, tmp_path, False)]
    if case == "checkpoint of another model":
        return [*image, "--run", _run_copy(run_dir, tmp_path, True, filters=4)]
    return (
        image
        + {
            "unknown variant": ["--variant", "7Q"],
            "missing weights file": ["--variant", str(tmp_path / "w.mpk")],
            "run folder missing": ["--run", str(tmp_path / "none")],
            "sigma for a plain model": [*model, "--sigma", "0.1"],
            "negative noise": [*model, "--noise", "-0.1"],
            "negative tile": [*model, "--tile", "-1"],
            "bad out ending": [*model, "--out", str(tmp_path / "x.txt")],
            "out folder missing": [*model, "--out", str(tmp_path / "a" / "b.png")],
            "no model": [],
            "two models": [*model, "--run", str(run_dir)],
        }[case]
    )


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing image", "nope.png' does not exist"),
        ("not an image", "cannot read image"),
        ("unknown variant", "6M"),
        ("missing weights file", "no such file"),
        ("run without checkpoint", "holds no checkpoint"),
        ("checkpoint of another model", "checkpoint"),
        ("run folder missing", "does not exist"),
        ("sigma for a plain model", "--sigma"),
        ("negative noise", "--noise"),
        ("negative tile", "--tile"),
        ("bad out ending", "image file ending"),
        ("out folder missing", "does not exist"),
        ("no model", "--variant"),
        ("two models", "not allowed with"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(case, words, gray, run_dir, tmp_path, capsys):
    argv = _bad_argv(case, gray, run_dir, tmp_path)
    out = tmp_path / "out.png"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    code, err = _exit_code(capsys, argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert words in err, err
    assert not out.exists()


@pytest.mark.slow
def test_a_colour_run_takes_the_channels_together(colour, gray, tmp_path, capsys):
    run = tmp_path / "colour-run"
    argv = ["train", *TINY_RUN, "--data", str(colour), "--out", str(run)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    out = tmp_path / "c.png"
    text = _denoise([str(colour), "--run", str(run), "--out", str(out)])
    assert "channels together" in text
    assert images.read_image(out).shape == (48, 40, 3)
    capsys.readouterr()  # the restored step, on stderr
    # A colour model cannot denoise a grayscale image.
    code, err = _exit_code(capsys, [str(gray), "--run", str(run), "--out", str(out)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "trained on 3-channel images" in err


def test_a_float_tiff_outside_0_1_is_refused_naming_its_range(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "counts.tif"
    values = np.linspace(100, 800, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(values, mode="F").save(path)
    out = tmp_path / "out.png"
    code, err = _exit_code(capsys, [str(path), "--variant", "6L", "--out", str(out)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "counts.tif" in err and "100..800 are not in [0, 1]" in err, err
    assert "rescale it to [0, 1]" in err
    assert not out.exists()
    # A float image in [0, 1] (noise may cross the bounds a little) is taken.
    Image.fromarray(values / 800 - 0.05, mode="F").save(path)
    text = _denoise([str(path), "--variant", "6L", "--out", str(out)])
    assert "counts.tif (32x32, 1 channel(s))" in text


def test_an_rgba_image_says_its_alpha_is_dropped(colour, tmp_path):
    from PIL import Image

    rgb = np.asarray(Image.open(colour))
    alpha = np.full(rgb.shape[:2] + (1,), 128, np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA").save(path)
    out = tmp_path / "out.png"
    text = _denoise([str(path), "--variant", "6L", "--out", str(out)])
    first = text.splitlines()[0]
    assert "(40x48, 3 channel(s); its alpha channel is dropped)" in first, first
    np.testing.assert_array_equal(images.read_image(path), images.read_image(colour))
    assert not images.has_alpha(colour) and images.has_alpha(path)
    assert "alpha" not in _denoise([str(colour), "--variant", "6L", "--out", str(out)])

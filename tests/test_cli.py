"""The `eqx-steps` command, run in-process through `main([...])` on the session's 4
CPU devices, and once as `python -m eqx_steps --devices 2` in a subprocess."""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from eqx_steps import cli, images, platform
from eqx_steps.synthetic import make_phantoms


TINY = [
    "--depth", "3", "--filters", "8", "--patch", "16", "--train-size", "64",
    "--test-size", "16", "--batch-size", "8", "--epochs", "1", "--lr", "1e-2",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"
# A real photograph (768x512 RGB), used when the shared data folder is beside the
# repository; otherwise a generated colour image stands in for it.
KODIM = pathlib.Path(__file__).resolve().parents[1].parent / "shared/data/kodim23.png"


def _table(text: str) -> dict[str, tuple[float, ...]]:
    """The rows of the printed test-set table: name -> (noisy input, denoised[,
    improvement])."""
    rows = {}
    names = ("test SNR (dB)", "test PSNR (dB, peak 1)", "test MSE")
    for name in (*names, "mean of per-patch SNRs (dB)"):
        m = re.search(rf"^  {re.escape(name)}((?:\s+[-+\d.e]+){{2,3}})$", text, re.M)
        assert m, f"no {name!r} row in:\n{text}"
        rows[name] = tuple(float(v) for v in m.group(1).split())
    return rows


def _exit_code(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    return int(info.value.code or 0), err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run: (run folder, printed output)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    return out, buf.getvalue()


def test_train_writes_the_run_folder(run):
    out, text = run
    files = set(os.listdir(out))
    for name in ("config.json", "metrics.jsonl", "curves.png", "samples.png"):
        assert name in files
    assert "8" in files  # 64 patches / batch 8 = 8 steps: the final checkpoint
    assert not [f for f in files if f.startswith(".tmp")]
    assert ".lock" not in files  # removed when the run ends
    assert text.rstrip().endswith(
        f"Run folder {out}: config.json, metrics.jsonl, curves.png, samples.png; "
        "checkpoints in the step folders 8"
    )
    for name in ("curves.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == PNG
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "dncnn" and config["depth"] == 3
    assert config["filters"] == 8 and config["patch"] == 16
    assert config["epochs"] == 1 and config["seed"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert records[-1]["step"] == 8 and "eval_snr" in records[-1]
    # The progress bar, then the summary with the improvement in dB.
    assert "train:" in text and "8/8" in text
    rows = _table(text)
    for name in ("test SNR (dB)", "mean of per-patch SNRs (dB)"):
        noisy, denoised, improvement = rows[name]
        assert improvement == pytest.approx(denoised - noisy, abs=0.02)
    # One headline test SNR: the table's is the eval_snr of the last log record
    # (the progress bar's, metrics.jsonl's, curves.png's), and its MSE eval_loss.
    assert rows["test SNR (dB)"][1] == pytest.approx(records[-1]["eval_snr"], abs=6e-3)
    assert rows["test MSE"][1] == pytest.approx(records[-1]["eval_loss"], rel=1e-3)
    assert "1 epoch x 8 steps of batch 8" in text  # not "1 epochs"


def test_the_readme_shows_what_the_command_prints(run):
    """README.md's sample output (docs/make_pictures.py writes it from a real
    run) has the lines the command prints now, up to the numbers, the run folder
    and the progress bar."""
    out, text = run
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "make_pictures", root / "docs" / "make_pictures.py"
    )
    pictures = importlib.util.module_from_spec(spec)  # pyright: ignore
    spec.loader.exec_module(pictures)  # pyright: ignore
    readme = (root / "README.md").read_text()
    block = readme.split(pictures.BEGIN)[1].split(pictures.END)[0]
    shown = block.strip().removeprefix("```").removesuffix("```")
    assert pictures.normalized(shown, pictures.SHOWN_RUN) == pictures.normalized(
        pictures.shorten(text), str(out)
    ), "README.md's sample output is stale: run python docs/make_pictures.py train"


def test_evaluate_and_info_read_the_run_back(run, capsys):
    out, text = run
    assert cli.main(["evaluate", str(out)]) == 0
    evaluated = capsys.readouterr().out
    assert "checkpoint step 8" in evaluated
    # The same checkpoint and the same regenerated test set: the same numbers.
    assert _table(evaluated) == _table(text)

    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert '"dncnn"' in info and "Parameters at checkpoint step 8" in info
    assert "conv_start.weight" in info and "Total weights:" in info
    assert "blocks[0].norm.mean" in info and "flat index" not in info
    assert "Last metrics record" in info and "eval_snr" in info
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert f"Test SNR {records[-1]['eval_snr']:.2f} dB at step 8" in info


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(run[0], out)
    # Settings from a TOML file; the command line overrides them.
    config = tmp_path / "more.toml"
    config.write_text("epochs = 3\nlr = 1e-2\n")
    argv = ["train", "--out", str(out), "--resume", "--config", str(config)]
    assert cli.main([*argv, "--epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "resuming at step 8" in text and "16/16" in text
    assert "16" in os.listdir(out)
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r["step"] for r in records]
    assert steps[-1] == 16 and steps == sorted(steps) and 8 in steps
    # The elapsed time continues across the resume (the curves, drawn from the
    # same History, show every step: tests/test_history.py).
    times = [r["time"] for r in records]
    assert times == sorted(times) and times[steps.index(8) + 1] > times[steps.index(8)]
    assert text.count("Done: step 16") == 1


def test_existing_run_folder_needs_resume(run, capsys):
    code, err = _exit_code(capsys, ["train", *TINY, "--out", str(run[0])])
    assert code == 2 and "--resume" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--epochs", "-1"], "--epochs"),
        (["train", "--epochs", "two"], "--epochs"),
        (["train", "--model", "foo"], "dncnn"),
        (["train", "--backend", "x"], "sharded"),
        (["train", "--lr", "0"], "--lr"),
        (["train", "--noise", "nan"], "--noise"),
        (["train", "--model", "unet", "--patch", "30"], "divisible"),
        (["train", "--resume"], "--out"),
        (["train", "--devices", "2"], "4 devices"),  # JAX already has 4 here
        (["evaluate", "/nonexistent/run"], "does not exist"),
        (["info", "/nonexistent/run"], "does not exist"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, argv, words):
    code, err = _exit_code(capsys, argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and words in err


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("typo.json", '{"model": "dncnn", "epoch": 3}', "did you mean 'epochs'"),
        ("type.toml", 'epochs = "three"\n', "integer"),
        ("broken.toml", "model = \n", "not valid TOML"),
        ("list.json", "[1, 2]", "table of settings"),
        ("choice.json", '{"backend": "mpi"}', "pmap, sharded"),
        (None, None, "cannot read"),
    ],
)
def test_bad_config_file_exits_2(capsys, tmp_path, name, content, words):
    path = tmp_path / (name or "missing.toml")
    if content is not None:
        path.write_text(content)
    code, err = _exit_code(capsys, ["train", "--config", str(path)])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert words in err


def test_library_validation_error_exits_2_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--batch-size", "6", "--out", str(out)]
    code, err = _exit_code(capsys, argv)  # 6 is not divisible by the 4 devices
    assert code == 2 and "divisible" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_run_folder_without_config_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"seed": 0}')
    code, err = _exit_code(capsys, ["evaluate", str(tmp_path)])
    assert code == 2 and "'model'" in err


def test_configure_xla_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    flags = platform.configure_xla_flags(3)
    assert "--xla_force_host_platform_device_count=3" in flags
    ynn = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
    assert (ynn in flags) == (platform.jaxlib_version() >= (0, 10))
    # A user's own XLA_FLAGS: kept, only the device count replaced.
    user = "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1"
    monkeypatch.setenv("XLA_FLAGS", user)
    flags = platform.configure_xla_flags(2)
    assert flags.split() == [
        "--xla_cpu_foo=1",
        "--xla_force_host_platform_device_count=2",
    ]
    monkeypatch.setenv("XLA_FLAGS", user)
    assert platform.configure_xla_flags(None) == user
    with pytest.raises(ValueError, match="devices"):
        platform.configure_xla_flags(0)


@pytest.mark.slow
def test_python_m_with_two_devices(tmp_path):
    """End to end in a fresh process: --devices 2 replaces the 4 of XLA_FLAGS."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "eqx_steps", "train", *TINY, "--out", str(out),
         "--devices", "2", "--backend", "sharded"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 cpu device(s)" in result.stdout
    assert "improvement" in result.stdout
    assert {"config.json", "metrics.jsonl", "curves.png", "samples.png", "8"} <= set(
        os.listdir(out)
    )
    assert json.loads((out / "config.json").read_text())["device_count"] == 2


def test_xla_device_count_requested_and_default(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    assert platform.requested_cpu_devices() is None
    platform.configure_xla_flags(3)
    assert platform.requested_cpu_devices() == 3
    assert 1 <= platform.default_cpu_devices() <= 4


# ---------------------------------------------------------------------------
# --data: the user's own images.


def _photo(tmp_path) -> pathlib.Path:
    """kodim23 when the shared data are there, else a generated 80x64 RGB image."""
    if KODIM.exists():
        return KODIM
    path = tmp_path / "photo.png"
    images.write_image(path, make_phantoms(1, size=80, channels=3, seed=5)[0, :, :64])
    return path


def _train(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["train", *TINY, *argv]) == 0
    return buf.getvalue()


@pytest.mark.slow
def test_train_on_one_colour_image(tmp_path, capsys):
    source, out = _photo(tmp_path), tmp_path / "run"
    text = _train(["--data", str(source), "--out", str(out)])
    assert "3 channel(s)" in text and "bottom" in text and "held out" in text
    files = set(os.listdir(out))
    assert {"config.json", "metrics.jsonl", "curves.png", "samples.png", "8"} <= files
    for name in ("curves.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == PNG
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == str(source.resolve()) and config["channels"] == 3
    rows = _table(text)
    noisy, denoised = rows["test PSNR (dB, peak 1)"][:2]
    assert denoised > noisy - 3  # trained a little
    # evaluate rebuilds the same held-out test set from config.json alone.
    assert cli.main(["evaluate", str(out)]) == 0
    assert _table(capsys.readouterr().out) == rows


@pytest.mark.slow
def test_train_on_a_folder_of_grayscale_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(make_phantoms(6, size=24, seed=1)):
        images.write_image(folder / f"im{i}.png", im)
    (folder / "README.txt").write_text("ignored")
    out = tmp_path / "run"
    text = _train(["--data", str(folder), "--out", str(out)])
    assert "5 training and 1 held-out test images" in text
    assert "1 channel(s)" in text and "improvement" in text
    assert json.loads((out / "config.json").read_text())["channels"] == 1


def _bad_data(kind: str, tmp_path: pathlib.Path) -> pathlib.Path:
    """A --data PATH that cannot be trained on, of the given kind."""
    folder = tmp_path / "data"
    if kind == "missing":
        return folder
    if kind.endswith(".npz"):
        np.savez(tmp_path / kind, a=np.zeros(3), b=np.zeros(3))
        return tmp_path / kind
    if kind == "flat.png":
        images.write_image(tmp_path / kind, np.zeros((20, 50)))  # 20 rows, patch 16
        return tmp_path / kind
    folder.mkdir()
    if kind == "junk":
        (folder / "x.png").write_bytes(b"junk")
    elif kind == "small":
        images.write_image(folder / "a.png", np.zeros((40, 40, 1)))
        images.write_image(folder / "b.png", np.zeros((10, 12, 1)))
    return folder


@pytest.mark.parametrize(
    "kind, words",
    [
        ("empty", "holds no image files"),
        ("junk", "cannot read image"),
        ("missing", "does not exist"),
        ("small", "is 10x12 pixels, smaller than --patch 16"),
        ("flat.png", "too small to hold out"),
        ("two.npz", "name the images"),
    ],
)
def test_bad_data_exits_2_with_one_line(tmp_path, capsys, kind, words):
    data = _bad_data(kind, tmp_path)
    out = tmp_path / "run"
    code, err = _exit_code(
        capsys, ["train", *TINY, "--data", str(data), "--out", str(out)]
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert words in err
    assert not out.exists()

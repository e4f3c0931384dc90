"""The command's deblurring and CT tasks (`eqx-steps train --task deblur|ct`) and
`eqx-steps restore`, run in-process through `main([...])` on the session's 4 CPU
devices, with tiny runs (16x16 foam phantoms, a few steps, few filters)."""

import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_steps import cli, images
from eqx_steps.cli import runs as cli_runs
from eqx_steps.synthetic import make_foam


PNG = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--patch", "16", "--train-size", "32", "--test-size", "8", "--batch-size",
    "8", "--epochs", "1", "--filters", "4", "--block-depth", "2", "--lr", "1e-2",
]  # fmt: skip
SNRS = re.compile(r"restored ([-+\d.]+) dB \(([-+\d.]+) dB\)")


def _main(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def _settings_of(*argv: str) -> dict:
    """The resolved settings of `train ARGV`, as the command resolves them."""
    return cli_runs.train_settings(argv)


# --- options that do not go together: refused before anything runs ---------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "modl"], "--model modl needs a forward operator: use --task"),
        (["--task", "ct", "--model", "unet"], "--task ct maps a sinogram.*modl"),
        (
            ["--task", "deblur", "--psf-size", "9", "--patch", "8"],
            "--psf-size 9 is larger than --patch 8.*--psf-size 8 or less",
        ),
        (
            ["--task", "deblur", "--model", "odp", "--block", "denoise"],
            "--block denoise is ODP's block for an identity operator",
        ),
        (
            ["--task", "ct", "--model", "odp", "--block", "deconv"],
            "--block deconv needs a circular convolution",
        ),
        (
            ["--task", "deblur", "--model", "odp", "--stage1-epochs", "2"],
            "--stage1-epochs is SCICO's two-stage recipe for MoDL",
        ),
        (["--task", "blur"], "--task: .*did you mean 'deblur'"),
        (["--task", "ct", "--model", "modl", "--depth", "0"], "--depth: .*>= 1"),
    ],
)
def test_options_that_do_not_go_together_are_refused(capsys, tmp_path, argv, message):
    err = _error(capsys, ["train", *argv, "--out", str(tmp_path / "run")])
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_the_task_defaults_are_scicos_examples():
    deblur = _settings_of("--task", "deblur", "--model", "modl")
    assert deblur["noise"] == pytest.approx(20 / 255)
    assert (deblur["psf"], deblur["psf_size"]) == ("uniform", 3)
    assert (deblur["depth"], deblur["block_depth"], deblur["cg_iter"]) == (2, 4, 4)
    odp = _settings_of("--task", "deblur", "--model", "odp")
    assert (odp["block"], odp["block_depth"]) == ("deconv", 3)
    ct = _settings_of("--task", "ct", "--model", "odp", "--patch", "256")
    assert ct["block"] == "grad_desc"
    assert (ct["angles"], ct["det_count"]) == (45, int(256 * 1.05 / np.sqrt(2)))
    # A denoising run is today's: noise 0.2, no operator settings in config.json.
    assert _settings_of()["noise"] == 0.2 and _settings_of()["task"] == "denoise"


@pytest.mark.parametrize("task", ["deblur", "ct"])
def test_the_data_are_measurements_of_foam_phantoms(task):
    """`image` is `A x + noise` of the `label` foams, the same on every call."""
    s = _settings_of(
        "--task", task, "--model", "modl", *TINY, "--noise", "0.05", "--angles", "8",
        "--test-size", "32",
    )  # fmt: skip
    data = cli_runs.run_data(s, train=False)
    assert data.train == {}
    x = data.test["label"]
    assert x.shape == (32, 16, 16, 1) and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(x, make_foam(32, size=16, seed=int(
        np.random.SeedSequence(0).spawn(4)[1].generate_state(1)[0])))  # fmt: skip
    op = cli_runs.run_operator(s, (16, 16))
    ax = np.asarray(jax.jit(jax.vmap(op))(jnp.asarray(x[..., 0])))[..., None]
    assert data.test["image"].shape == ax.shape
    noise = data.test["image"] - ax
    assert np.std(noise) == pytest.approx(0.05, rel=0.1)
    if task == "ct":  # SCICO's normalised projector: A / N over [0, pi]
        assert ax.shape[1:] == (8, int(16 * 1.05 / np.sqrt(2)), 1)
        assert float(np.max(ax)) < 1.0


@pytest.mark.parametrize("channels", [1, 3])
def test_deblur_data_from_your_own_images(tmp_path, channels):
    """`--data PATH`: patches of the images, blurred by the run's operator (each
    channel of a colour image alike), noise drawn once."""
    from eqx_steps.synthetic import make_phantoms

    for i, x in enumerate(make_phantoms(5, size=24, channels=channels, seed=1)):
        images.write_image(tmp_path / f"{i}.png", x)
    s = _settings_of(
        "--task", "deblur", "--model", "unet", "--depth", "2", *TINY,
        "--data", str(tmp_path), "--psf", "gaussian", "--psf-size", "5",
    )  # fmt: skip
    s["data"] = str(tmp_path)
    data = cli_runs.run_data(s)
    assert data.channels == channels and "blurred" in data.description
    x, y = data.train["label"], data.train["image"]
    assert x.shape == y.shape == (32, 16, 16, channels)
    op = cli_runs.run_operator(s, (16, 16) if channels == 1 else (16, 16, channels))
    ax = np.asarray(
        jax.jit(jax.vmap(op))(jnp.asarray(x[..., 0] if channels == 1 else x))
    )
    noise = y - (ax[..., None] if channels == 1 else ax)
    assert np.std(noise) == pytest.approx(20 / 255, rel=0.1)
    for c in range(channels):  # one kernel per channel, no mixing
        single = jax.vmap(cli_runs.run_operator(s, (16, 16)))(jnp.asarray(x[..., c]))
        np.testing.assert_allclose(
            (ax[..., None] if channels == 1 else ax)[..., c], single, atol=1e-5
        )


def test_foam_is_a_union_of_disks_prefix_stable():
    x = make_foam(6, size=48, seed=3)
    assert x.shape == (6, 48, 48, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:2], make_foam(2, size=48, seed=3))
    assert not np.array_equal(x, make_foam(6, size=48, seed=4))
    assert x[:, 0, 0].max() == 0 and 0 <= x.min() and x.max() == 1
    # Pores: the disk's inside is not all bright.
    inner = x[:, 12:36, 12:36]
    assert 0.2 < float(np.mean(inner < 0.5)) < 0.8
    with pytest.raises(ValueError, match="`size` must be an integer >= 1"):
        make_foam(1, size=0)


# --- restore: refused inputs (a run folder's config.json is all it needs) ---------


@pytest.fixture
def ct_config(tmp_path):
    run = tmp_path / "ctrun"
    run.mkdir()
    config = {"model": "modl", "task": "ct", "patch": 16, "angles": 12}
    (run / "config.json").write_text(json.dumps(config))
    return run


def test_restore_names_both_shapes_for_a_wrong_sized_image(capsys, tmp_path, ct_config):
    image = tmp_path / "big.png"
    images.write_image(image, make_foam(1, size=24)[0])
    err = _error(capsys, ["restore", str(image), "--run", str(ct_config), "--simulate"])
    assert "is 24x24 with 1 channel(s)" in err and "16x16 grayscale images" in err
    assert "resize it to 16x16" in err and "--patch 24" in err
    sino = tmp_path / "sino.npy"
    # SCICO's detector count for 16x16: int(16 * 1.05 / sqrt(2)) = 11
    np.save(sino, np.zeros((10, 11), np.float32))
    err = _error(capsys, ["restore", str(sino), "--run", str(ct_config)])
    assert "shape (10, 11)" in err and "sinograms of shape (12, 11)" in err
    assert "--angles 12, --det-count 11" in err and "--simulate" in err
    err = _error(
        capsys, ["restore", str(sino), "--run", str(ct_config), "--noise", "1"]
    )
    assert "--noise goes with --simulate" in err


def test_restore_refuses_an_image_smaller_than_the_psf(capsys, tmp_path):
    run = tmp_path / "deblur"
    run.mkdir()
    config = {"model": "modl", "task": "deblur", "patch": 16, "psf_size": 5}
    (run / "config.json").write_text(json.dumps(config))
    image = tmp_path / "tiny.png"
    images.write_image(image, np.zeros((4, 8, 1), np.float32))
    err = _error(capsys, ["restore", str(image), "--run", str(run)])
    assert "is 4x8, smaller than the run's 5x5 blur kernel (--psf-size 5)" in err
    err = _error(capsys, ["denoise", str(image), "--run", str(run)])
    assert "learnt --task deblur" in err and "eqx-steps restore" in err


# --- tiny runs: train, evaluate, info, restore ------------------------------------


def _table(text: str) -> dict[str, tuple[float, ...]]:
    rows = {}
    for name in ("test SNR (dB)", "mean of per-patch SNRs (dB)"):
        m = re.search(rf"^  {re.escape(name)}((?:\s+[-+\d.e]+){{3}})$", text, re.M)
        assert m, f"no {name!r} row in:\n{text}"
        rows[name] = tuple(float(v) for v in m.group(1).split())
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs, by name: (run folder, printed output)."""
    root = tmp_path_factory.mktemp("tasks")
    argvs = {
        # SCICO's two-stage MoDL: 1 epoch at depth 1, then 1 at depth 2.
        "modl": ["--task", "deblur", "--model", "modl", "--depth", "2",
                 "--cg-iter", "2", "--stage1-epochs", "1", "--stage1-cg-iter", "1"],
        "odp": ["--task", "deblur", "--model", "odp", "--depth", "2",
                "--psf", "gaussian", "--psf-size", "5"],
        "ct": ["--task", "ct", "--model", "modl", "--depth", "1", "--cg-iter", "2",
               "--angles", "12"],
        "denoise": ["--depth", "2"],
    }  # fmt: skip

    class Runs(dict):  # each run trained when a test first asks for it
        def __missing__(self, name):
            folder = root / name
            self[name] = (
                folder,
                _main(["train", *TINY, *argvs[name], "--out", str(folder)]),
            )
            return self[name]

    return Runs()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["modl", "odp", "ct"])
def test_a_run_knows_its_task(runs, name):
    folder, text = runs[name]
    config = json.loads((folder / "config.json").read_text())
    task = "ct" if name == "ct" else "deblur"
    assert config["task"] == task and config["model"] == name.replace("ct", "modl")
    assert (folder / "samples.png").read_bytes()[:8] == PNG
    assert "4" in {p.name for p in folder.iterdir()}  # 32 / 8 steps: checkpoint 4
    column = "back-proj." if task == "ct" else "blurred input"
    assert re.search(rf"^\s+{re.escape(column)}\s+restored\s+improvement$", text, re.M)
    trained = _table(text)
    assert _table(_main(["evaluate", str(folder)])) == trained
    info = _main(["info", str(folder)])
    assert f"Task: {task}" in info
    assert re.search(rf'^  task +"{task}"$', info, re.M), info
    assert "lmbda" in info if name != "odp" else "blocks[1].alpha" in info


@pytest.mark.slow
def test_two_stage_modl_trains_depth_1_first(runs):
    folder, text = runs["modl"]
    assert "stage 1 of SCICO's two-stage MoDL: depth 1, cg_iter 1" in text
    assert (folder / "stage1" / "4").is_dir()  # stage 1's checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert (config["depth"], config["cg_iter"], config["stage1_epochs"]) == (2, 2, 1)


@pytest.mark.slow
def test_restore_a_blurred_image(runs, tmp_path):
    folder, _ = runs["modl"]
    clean = tmp_path / "foam.png"
    images.write_image(clean, make_foam(1, size=24, seed=9)[0])  # any size
    out = tmp_path / "restored.png"
    text = _main(["restore", str(clean), "--run", str(folder), "--simulate",
                  "--out", str(out)])  # fmt: skip
    assert SNRS.search(text), text
    assert images.read_image(out).shape == (24, 24, 1)
    assert (tmp_path / "restored-compare.png").read_bytes()[:8] == PNG
    # A blurred image itself, and ODP's deconvolution blocks.
    text = _main(["restore", str(out), "--run", str(runs["odp"][0]),
                  "--out", str(tmp_path / "again.png")])  # fmt: skip
    assert "measured, 24x24" in text


@pytest.mark.slow
def test_restore_ct_from_a_sinogram_or_a_simulated_image(runs, tmp_path):
    folder, _ = runs["ct"]
    clean = tmp_path / "foam.png"
    images.write_image(clean, make_foam(1, size=16, seed=9)[0])
    text = _main(["restore", str(clean), "--run", str(folder), "--simulate",
                  "--out", str(tmp_path / "a.png")])  # fmt: skip
    assert SNRS.search(text), text
    sino = tmp_path / "sino.npy"
    np.save(sino, np.ones((12, 11), np.float32) * 0.1)
    _main(
        ["restore", str(sino), "--run", str(folder), "--out", str(tmp_path / "b.png")]
    )
    assert images.read_image(tmp_path / "b.png").shape == (16, 16, 1)


@pytest.mark.slow
def test_restore_with_a_denoising_run_is_eqx_steps_denoise(runs, tmp_path):
    folder, _ = runs["denoise"]
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["task"] == "denoise" and "psf" not in config and "angles" not in config
    )
    clean = tmp_path / "foam.png"
    images.write_image(clean, make_foam(1, size=20, seed=9)[0])
    argv = ["--run", str(folder), "--seed", "3"]
    out = tmp_path / "r.png"
    text = _main(["restore", str(clean), *argv, "--simulate", "--out", str(out)])
    assert "eqx-steps denoise:" in text and f"noise std {config['noise']:g}" in text
    same = _main(["denoise", str(clean), *argv, "--noise", str(config["noise"]),
                  "--out", str(tmp_path / "d.png")])  # fmt: skip
    line = re.compile(r"SNR against the original: .*")
    assert line.findall(text) == line.findall(same)
    np.testing.assert_array_equal(
        images.read_image(out), images.read_image(tmp_path / "d.png")
    )

"""Streaming an image folder through Grain: `eqx_steps.pipeline.image_folder_dataset`
and `eqx-steps train --data FOLDER`."""

import contextlib
import io
import itertools
import json
import pathlib
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

import eqx_steps as es
from eqx_steps import cli, images
from eqx_steps.pipeline import image_folder_dataset, PipelineError


def _write(folder: pathlib.Path, name: str, pixels: np.ndarray) -> pathlib.Path:
    path = folder / name
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """Five small images of different sizes: 8-bit grayscale and colour, 16-bit
    grayscale."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    _write(folder, "a.png", rng.integers(0, 256, (20, 24), np.uint8))
    _write(folder, "b.png", rng.integers(0, 256, (18, 30, 3), np.uint8))
    _write(folder, "c.png", rng.integers(0, 65536, (26, 17), np.uint16))
    _write(folder, "d.png", rng.integers(0, 256, (16, 16, 3), np.uint8))
    _write(folder, "e.png", rng.integers(0, 256, (31, 22), np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _dataset(folder, **kwargs):
    args = dict(patch_size=8, batch_size=4, patches_per_epoch=24, seed=3)
    return image_folder_dataset(folder, **(args | kwargs))


def _take(ds, n: int) -> list[dict[str, np.ndarray]]:
    iterator = iter(ds)
    batches = list(itertools.islice(iterator, n))
    iterator.close()
    return batches


def _crops(folder: pathlib.Path, size: int, turned: bool) -> set[bytes]:
    """Every `size` x `size` crop of the folder's images (as `read_images` reads
    them, in 3 channels), and with `turned` every turn and flip of them."""
    out = set()
    for _, im in images.read_images(folder):
        im = np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im
        for y in range(im.shape[0] - size + 1):
            for x in range(im.shape[1] - size + 1):
                crop = im[y : y + size, x : x + size]
                for k in range(4 if turned else 1):
                    turn = np.rot90(crop, k, axes=(0, 1))
                    for p in (turn, turn[:, ::-1]) if turned else (turn,):
                        out.add(np.ascontiguousarray(p).tobytes())
    return out


@pytest.mark.parametrize("augment", [False, True])
def test_batches_are_crops_of_the_images(folder, augment):
    ds = _dataset(folder, augment=augment)
    assert len(ds) == 24 // 4 and ds.channels == 3 and not ds.skipped
    assert [pathlib.Path(h.path).name for h in ds.headers] == [
        "a.png", "b.png", "c.png", "d.png", "e.png"
    ]  # fmt: skip
    crops = _crops(folder, 8, augment)
    batches = _take(ds, 12)  # two epochs
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["label"].shape == (4, 8, 8, 3)
        assert batch["label"].dtype == np.float32
        assert batch["image"] is batch["label"]  # noise_std=None: no noise
        for patch in batch["label"]:
            assert np.ascontiguousarray(patch).tobytes() in crops
    if augment:  # some patch is turned or flipped, so not a plain crop
        plain = _crops(folder, 8, False)
        labels = [p for b in batches for p in b["label"]]
        assert any(np.ascontiguousarray(p).tobytes() not in plain for p in labels)


def test_same_seed_same_batches_fresh_patches_every_epoch(folder):
    first = _take(_dataset(folder, augment=True), 12)
    again = _take(_dataset(folder, augment=True), 12)
    other = _take(_dataset(folder, augment=True, seed=4), 12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
    # Epoch 1 (batches 6..11) cuts other patches than epoch 0 (batches 0..5).
    epoch0 = {p.tobytes() for b in first[:6] for p in b["label"]}
    epoch1 = {p.tobytes() for b in first[6:] for p in b["label"]}
    assert len(epoch0 & epoch1) < len(epoch0) // 2


@given(st.integers(0, 14), st.booleans())
@settings(max_examples=4)
def test_iterator_state_round_trip(folder, k, augment):
    """An iterator restored from the state of another after `k` batches goes on
    with the batches the other one yields (what a checkpoint of it needs)."""
    ds = _dataset(folder, augment=augment, noise_std=0.1, shuffle_window=10)
    first = iter(ds)
    for _ in range(k):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(4)]
    second = iter(ds)
    second.set_state(state)
    for want in expected:
        got = next(second)
        np.testing.assert_array_equal(got["image"], want["image"])
    first.close()
    second.close()


def test_noise_is_seeded_and_of_the_given_std(folder):
    ds = _dataset(folder, noise_std=0.5, patches_per_epoch=200, batch_size=100)
    batches = _take(ds, 2)
    again = _take(_dataset(folder, noise_std=0.5, patches_per_epoch=200,
                           batch_size=100), 2)  # fmt: skip
    noise = np.concatenate([b["image"] - b["label"] for b in batches])
    assert abs(float(noise.std()) - 0.5) < 0.01 and abs(float(noise.mean())) < 0.01
    np.testing.assert_array_equal(batches[1]["image"], again[1]["image"])
    assert not np.array_equal(noise[:100], noise[100:])  # new noise every batch


def test_grayscale_folder_gives_one_channel(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        _write(tmp_path, f"{i}.png", rng.integers(0, 256, (12, 12), np.uint8))
    ds = _dataset(tmp_path, patch_size=12)
    batch = _take(ds, 1)[0]
    assert ds.channels == 1 and batch["label"].shape == (4, 12, 12, 1)
    # A 12x12 patch of a 12x12 image is the whole image: exact values, /255.
    whole = {im.tobytes() for _, im in images.read_images(tmp_path)}
    assert all(p.tobytes() in whole for p in batch["label"])
    assert _dataset(tmp_path, patch_size=12, channels=3).channels == 3


def test_unreadable_image_skipped_and_counted_or_refused(folder, tmp_path):
    for f in folder.glob("*.png"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken\.png"):
        ds = _dataset(tmp_path)
    assert [pathlib.Path(p).name for p, _ in ds.skipped] == ["broken.png"]
    assert len(ds.headers) == 5
    assert len(_take(ds, 7)) == 7
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        _dataset(tmp_path, on_error="raise")


def test_image_broken_after_its_header_skipped_or_refused_when_decoded(tmp_path):
    rng = np.random.default_rng(2)
    _write(tmp_path, "a.png", rng.integers(0, 256, (16, 16), np.uint8))
    good = _write(tmp_path, "b.png", rng.integers(0, 256, (16, 16), np.uint8))
    (tmp_path / "b.png").write_bytes(good.read_bytes()[:60])  # header, cut data
    ds = _dataset(tmp_path, patch_size=16, on_error="raise")
    assert not ds.skipped  # its header reads
    with pytest.raises(PipelineError, match=r"cannot read image .*b\.png"):
        _take(ds, 12)
    ds = _dataset(tmp_path, patch_size=16)
    with pytest.warns(UserWarning, match=r"skipped an unreadable image.*b\.png"):
        batches = _take(ds, 3)
    whole = images.read_image(tmp_path / "a.png").tobytes()
    assert all(p.tobytes() == whole for b in batches for p in b["label"])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"patch_size": 17}, r"d\.png' is 16x16 pixels, smaller than `patch_size`"),
        ({"patches_per_epoch": 3}, r"`patches_per_epoch` \(3\) is smaller"),
        ({"workers": -1}, "workers"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"on_error": "ignore"}, "on_error"),
        ({"channels": 1}, "channels"),
    ],
)
def test_bad_arguments_are_refused(folder, kwargs, words):
    with pytest.raises(ValueError, match=words):
        _dataset(folder, **kwargs)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        _dataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="holds no image files"):
        _dataset(tmp_path)


@pytest.mark.slow
def test_workers_give_the_same_batches(folder):
    """Decoded in two worker processes, the batches are those of no worker."""
    here = _take(_dataset(folder, augment=True, noise_std=0.1), 9)
    there = _take(_dataset(folder, augment=True, noise_std=0.1, workers=2), 9)
    for a, b in zip(here, there):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.slow
def test_trainer_trains_on_the_stream(folder, tmp_path):
    import equinox as eqx
    import jax

    model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
        depth=2, channels=3, num_filters=4, key=jax.random.key(0)
    )
    ds = _dataset(folder, noise_std=0.1)
    trainer = es.BasicTrainer(
        {"num_epochs": 2, "batch_size": 4, "log_every_steps": 6},
        model,
        ds,
        model_state=model_state,
    )
    assert trainer.steps_per_epoch == 6 and trainer.num_steps == 12
    state, history = trainer.train()
    assert int(state.step) == 12
    assert [r["epoch"] for r in history.records] == [1, 2]


# ---------------------------------------------------------------------------
# eqx-steps train --data FOLDER

TINY = [
    "--depth", "2", "--filters", "4", "--patch", "8", "--train-size", "16",
    "--test-size", "8", "--batch-size", "8", "--epochs", "1",
]  # fmt: skip


def _main(argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


def _table(text: str) -> str:
    return text[text.index("Test set:") : text.index("Test SNR, PSNR")]


@pytest.mark.slow
def test_train_streams_a_folder_and_evaluate_rebuilds_its_test_set(
    folder, tmp_path, capsys
):
    data = tmp_path / "data"
    data.mkdir()
    for f in folder.glob("*.png"):
        (data / f.name).write_bytes(f.read_bytes())
    (data / "zz.png").write_bytes(b"junk")
    out = tmp_path / "run"
    text = _main(["train", *TINY, "--data", str(data), "--out", str(out), "--augment"])
    assert "streamed by Grain" in text and "turned and flipped" in text
    assert "4 training and 1 held-out test images; 1 unreadable skipped" in text
    assert re.search(r"skipped 1 unreadable image.*zz\.png", capsys.readouterr().err)
    config = json.loads((out / "config.json").read_text())
    assert config["augment"] is True and config["workers"] == 0
    assert config["on_bad_image"] == "skip" and config["channels"] == 3
    assert _table(_main(["evaluate", str(out)])) == _table(text)


def test_train_refuses_a_bad_image_when_asked(folder, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for f in folder.glob("*.png"):
        (data / f.name).write_bytes(f.read_bytes())
    (data / "zz.png").write_bytes(b"junk")
    argv = ["train", *TINY, "--data", str(data), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--on-bad-image", "raise"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"cannot read image .*zz\.png", err)
    assert not (tmp_path / "run").exists()


def test_augment_needs_a_folder(tmp_path, capsys):
    one = _write(tmp_path, "one.png", np.zeros((40, 40), np.uint8))
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *TINY, "--data", str(one), "--augment",
                  "--out", str(tmp_path / "run")])  # fmt: skip
    assert info.value.code == 2 and "--augment" in capsys.readouterr().err


@pytest.mark.slow
def test_train_stops_on_an_image_that_cannot_be_decoded(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c"):  # c is the test image
        _write(tmp_path, f"{name}.png", rng.integers(0, 256, (16, 16), np.uint8))
    data = tmp_path / "b.png"
    data.write_bytes(data.read_bytes()[:60])  # its header reads, its pixels not
    out = tmp_path / "run"
    argv = ["train", *TINY, "--data", str(tmp_path), "--out", str(out)]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--on-bad-image", "raise"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"image pipeline stopped: cannot read image .*b\.png", err)
    assert not out.exists()


@pytest.mark.slow
def test_a_worker_that_dies_stops_the_pipeline_with_its_error(folder):
    import psutil

    iterator = iter(_dataset(folder, workers=1))
    next(iterator)
    (worker,) = [
        p
        for p in psutil.Process().children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]
    worker.kill()  # not reaped here: Grain reads its exit status
    with pytest.raises(PipelineError, match="terminated unexpectedly"):
        for _ in range(1000):  # what the worker had sent before it died
            next(iterator)
    iterator.close()


def test_train_refuses_an_epoch_smaller_than_a_batch(folder, tmp_path, capsys):
    argv = ["train", *TINY, "--data", str(folder), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--train-size", "4"])
    err = capsys.readouterr().err
    assert (
        info.value.code == 2 and "--train-size 4 is smaller than --batch-size 8" in err
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_stream_the_folder_as_one_process_does(folder, tmp_path):
    """Each process reads the same stream of global batches and keeps its rows:
    2 processes x 2 devices train as 1 process x 4 devices."""
    import os
    import socket
    import subprocess
    import sys

    args = [
        sys.executable, "-m", "eqx_steps", "train", "--data", str(folder),
        "--depth", "2", "--filters", "4", "--patch", "8", "--train-size", "16",
        "--test-size", "8", "--batch-size", "8", "--epochs", "2", "--devices", "2",
        "--backend", "sharded",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [
        subprocess.Popen(
            [
                *args,
                "--out",
                str(tmp_path / "two"),
                "--coordinator",
                coordinator,
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "streamed by Grain" in outs[0], outs[0]
    one = [*args[:-4], "--devices", "4", "--backend", "sharded"]
    single = subprocess.run(
        [*one, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr

    def last(run: str) -> dict:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])

    two, one_ = last("two"), last("one")
    for name in ("train_loss", "eval_loss", "eval_snr"):
        np.testing.assert_allclose(two[name], one_[name], rtol=1e-4, err_msg=name)

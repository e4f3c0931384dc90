"""Faults around the run folder: a disk that fills up during a save, a corrupt
latest checkpoint, a folder that is a file or not writable, two runs on one
folder, a torn metrics line."""

import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqx_steps as es
from eqx_steps import cli


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = [
    "--depth", "3", "--filters", "8", "--patch", "16", "--train-size", "32",
    "--test-size", "16", "--batch-size", "8", "--epochs", "2", "--lr", "1e-2",
]  # fmt: skip
READ_ONLY = "/sys/eqx-steps-test"  # not writable, even by root


def _state(step=0, size=4):
    model = eqx.nn.Linear(size, size, key=jax.random.key(0))
    return es.TrainState.create(model, optax.sgd(0.1)).replace(step=jnp.asarray(step))


def _exit(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return int(info.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    worker = os.path.join(HERE, "fsize_worker.py")
    done = subprocess.run(
        [sys.executable, worker, str(tmp_path)], capture_output=True, text=True,
        env=env, timeout=120,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[0].startswith("error OSError: could not save checkpoint step 1 in")
    assert str(tmp_path) in lines[0] and "File too large" in lines[0]
    assert "the last complete checkpoint (step 0) is intact" in lines[0]
    assert lines[1] == "leftovers ['0']"  # no temporary folder behind
    restored = es.checkpoint_restore(_state(5, size=512), tmp_path)
    assert int(restored.step) == 0


def _corrupt_latest(workdir):
    latest = es.latest_step(workdir)
    for root, _, files in os.walk(os.path.join(workdir, str(latest), "state")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
    return latest


def test_a_corrupt_latest_checkpoint_falls_back_only_when_asked(tmp_path):
    for step in (1, 2):
        es.checkpoint_save(_state(step), None, tmp_path)
    _corrupt_latest(tmp_path)
    with pytest.raises(ValueError, match="step 2 .* corrupt.*fallback=True"):
        es.checkpoint_restore(_state(), tmp_path)
    with pytest.warns(es.CheckpointFallbackWarning, match="restored checkpoint step 1"):
        restored = es.checkpoint_restore(_state(), tmp_path, fallback=True)
    assert int(restored.step) == 1


def test_checkpoint_save_into_a_file_names_it(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="a-file.*is a file"):
        es.checkpoint_save(_state(), None, path)


def test_an_unwritable_checkpoint_folder_fails_before_training():
    with pytest.raises(OSError, match="checkpoint folder .*eqx-steps-test.* not writ"):
        es.prepare_workdir(READ_ONLY)


def test_out_under_a_read_only_parent_is_one_line(capsys):
    code, err = _exit(capsys, ["train", *TINY, "--out", READ_ONLY + "/run"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "not writable" in err and READ_ONLY in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_resuming_a_read_only_run_folder_fails_before_training(run_dir, capsys):
    os.chmod(run_dir, 0o555)
    try:
        code, err = _exit(capsys, ["train", "--out", str(run_dir), "--resume"])
    finally:
        os.chmod(run_dir, 0o755)
    assert code == 2 and "not writable" in err


def test_a_second_run_on_the_same_folder_is_one_line(run_dir, capsys):
    with open(run_dir / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train holds it
        code, err = _exit(capsys, ["train", "--out", str(run_dir), "--resume"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is in use by another eqx-steps train" in err


def test_fallback_goes_with_resume(capsys):
    code, err = _exit(capsys, ["train", *TINY, "--fallback"])
    assert code == 2 and "--resume" in err


@pytest.mark.slow
def test_resume_says_which_step_and_why(run_dir, capsys, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    latest = _corrupt_latest(copy)
    code, err = _exit(capsys, ["train", "--out", str(copy), "--resume"])
    assert code == 2 and f"step {latest}" in err and "--fallback" in err
    argv = ["train", "--out", str(copy), "--resume", "--fallback", "--epochs", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"--fallback restored checkpoint step {latest - 4}" in out, out


@pytest.mark.slow
def test_a_torn_metrics_line_is_ignored_and_cut_on_resume(run_dir, capsys, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    metrics = copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    with open(metrics, "a") as f:
        f.write('{"step": 99, "eval_lo')  # a crash in the middle of an append
    assert cli.main(["info", str(copy)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--out", str(copy), "--resume", "--epochs", "3"]) == 0
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert records[: len(lines)] == [json.loads(x) for x in lines]
    assert all(r["step"] != 99 for r in records)

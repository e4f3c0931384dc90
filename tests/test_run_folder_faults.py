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
import numpy as np
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


def _damage_array_data(workdir):
    """Truncate the array data files of the latest step, leaving its metadata and
    manifests whole: the arrays' reads fail, not the step's JSON."""
    latest = es.latest_step(workdir)
    for root, _, files in os.walk(os.path.join(workdir, str(latest), "state")):
        if os.path.basename(root) == "d":
            for name in files:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
    return latest


# A program of one device, as a user runs it (the tests' four CPU devices change
# orbax's read timing so that the stray tracebacks do not show).
_ONE_DEVICE = {
    **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
    "PYTHONPATH": ROOT,
}

_DAMAGED_RESTORE = """
import os, sys, time, equinox as eqx, jax, jax.numpy as jnp, optax
import eqx_steps as es

def state(step=0):  # many arrays: many reads in flight at once
    model = eqx.nn.MLP(4, 4, 4, depth=12, key=jax.random.key(0))
    state = es.TrainState.create(model, optax.adam(0.1))
    return state.replace(step=jnp.asarray(step))

workdir = sys.argv[1]
for step in (1, 2):
    es.checkpoint_save(state(step), None, workdir)
for root, _, files in os.walk(os.path.join(workdir, "2", "state")):
    if os.path.basename(root) == "d":  # the array data, not the metadata
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
try:
    es.checkpoint_restore(state(), workdir)
except es.CorruptCheckpointError as e:
    print(type(e).__name__, isinstance(e, ValueError), e.step, e.reason[:13])
time.sleep(0.5)  # any read left in flight has completed by now
restored = es.checkpoint_restore(state(), workdir, fallback=True)
print("fallback", int(restored.step))
"""


@pytest.mark.slow
def test_a_damaged_step_raises_on_its_own_with_nothing_left_in_flight(tmp_path):
    # orbax reads a step's arrays with one asyncio.gather in an event loop it
    # closes when a read fails; the other reads used to complete into the closed
    # loop, each printing "RuntimeError: Event loop is closed" on stderr.
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _DAMAGED_RESTORE, str(tmp_path)],
        capture_output=True,
        text=True,
        env=_ONE_DEVICE,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert proc.stdout.splitlines() == [
        "CorruptCheckpointError True 2 ValueError: O",
        "fallback 1",
    ], proc.stdout


@pytest.mark.slow
def test_the_commands_print_one_line_for_a_damaged_step(run_dir, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)
    latest = _damage_array_data(copy)
    image = tmp_path / "in.png"
    es.images.write_image(image, np.full((16, 16), 0.5))

    def command(*argv):
        proc = subprocess.run(
            [sys.executable, "-m", "eqx_steps", *argv],
            capture_output=True,
            text=True,
            env=_ONE_DEVICE,
            cwd=tmp_path,
        )
        return proc.returncode, proc.stdout, proc.stderr

    for argv in (
        ["train", "--out", str(copy), "--resume"],
        ["evaluate", str(copy)],
        ["denoise", str(image), "--run", str(copy)],
    ):
        code, _, err = command(*argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert f"checkpoint step {latest} in" in err and "corrupt" in err, err
        assert "_CorruptStep" not in err and "Event loop" not in err
    code, out, err = command(
        "train", "--out", str(copy), "--resume", "--fallback", "--epochs", "3"
    )
    assert code == 0 and err.strip() == "", err
    assert f"--fallback restored checkpoint step {latest - 4}" in out, out


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


def _step_folders(run_dir):
    return sorted(n for n in os.listdir(run_dir) if n.isdigit())


@pytest.mark.slow
def test_a_picture_that_cannot_be_written_is_one_line_and_keeps_the_checkpoints(
    run_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run_dir), str(out)], check=True)
    os.remove(out / "curves.png")
    (out / "curves.png").mkdir()  # written when training ends
    argv = ["train", "--out", str(out), "--resume", "--epochs", "3"]
    code, err = _exit(capsys, argv)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot write '{out / 'curves.png'}': it is a folder" in err, err
    assert "Traceback" not in err
    # Training finished and its checkpoints are whole: the run resumes from them.
    assert es.latest_step(out) == 12 and "12" in _step_folders(out)


@pytest.mark.slow
def test_a_full_disk_while_writing_a_picture_is_one_line(tmp_path):
    # A subprocess under a 4 KiB file-size limit: the comparison picture
    # (about 20 KB) fails with EFBIG, as on a full disk.
    image = tmp_path / "in.png"
    es.images.write_image(image, np.linspace(0, 1, 64 * 64).reshape(64, 64))
    code = (
        "import resource, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        "from eqx_steps import cli; sys.exit(cli.main(sys.argv[1:]))"
    )
    argv = ["denoise", str(image), "--variant", "6L", "--out", str(tmp_path / "o.png")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        # No compilation cache: its files would meet the size limit first.
        env={
            **{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
            "PYTHONPATH": ROOT,
        },
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "cannot write" in err and "o-compare.png" in err, err
    assert "File too large" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]

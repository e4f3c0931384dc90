"""SIGINT and SIGTERM sent to real training processes: the step in flight finishes,
a checkpoint is saved, the run stops with TrainingInterrupted (the command: one
line, exit 130/143), and resuming ends in the state of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from preempt_common import host_leaves, make_trainer, NUM_STEPS

import eqx_steps as es
from eqx_steps import cli


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = [
    "--depth", "3", "--filters", "8", "--patch", "16", "--train-size", "64",
    "--test-size", "16", "--batch-size", "8", "--epochs", "3", "--lr", "1e-2",
    "--devices", "4",
]  # fmt: skip


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start(args):
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        start_new_session=True,
    )


def signal_when(p, marker: bytes, signals, gap_s=0.0):
    """Read `p`'s stdout until `marker`, then send it `signals` (`gap_s` apart);
    return (exit status, stdout, stderr, seconds from the first signal to exit)."""
    seen = b""
    while marker not in seen:
        chunk = os.read(p.stdout.fileno(), 4096)
        assert chunk, f"ended before {marker!r}: {seen.decode()}{p.stderr.read()}"
        seen += chunk
    t0 = time.monotonic()
    for i, s in enumerate(signals):
        if i:
            time.sleep(gap_s)
        p.send_signal(s)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, (seen + out).decode(), err.decode(), time.monotonic() - t0


def tmp_folders(workdir):
    return [n for n in os.listdir(workdir) if "orbax-checkpoint-tmp" in n]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final model of an uninterrupted run (in this process, 4 devices)."""
    state, _ = make_trainer(tmp_path_factory.mktemp("ref")).train()
    return host_leaves(state.model)


@pytest.mark.slow
def test_sigterm_saves_the_step_in_flight_and_resume_is_exact(reference, tmp_path):
    worker = os.path.join(HERE, "preempt_worker.py")
    p = start([worker, str(tmp_path)])
    code, out, err, _ = signal_when(p, b"step 5\n", [signal.SIGTERM])
    assert code == 143, out + err
    stopped = int(out.split("interrupted SIGTERM step ")[1].split()[0])
    assert 5 <= stopped < NUM_STEPS and "checkpoint True" in out
    # Nothing lost beyond the call in flight: its step is the latest checkpoint.
    assert es.latest_step(tmp_path) == stopped and not tmp_folders(tmp_path)
    p = start([worker, str(tmp_path)])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and f"done step {NUM_STEPS}" in out.decode(), err
    final = np.load(tmp_path / "final-0.npz")
    for a, k in zip(reference, final.files):
        np.testing.assert_array_equal(a, final[k])


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_the_latest_checkpoint_restores(tmp_path):
    worker = os.path.join(HERE, "preempt_worker.py")
    p = start([worker, str(tmp_path)])
    gap = random.Random(0).uniform(0.0, 0.3)
    code, out, err, seconds = signal_when(
        p, b"step 13\n", [signal.SIGINT, signal.SIGINT], gap
    )
    # 130: the second signal landed during the save and ended the process at once;
    # -SIGINT: the save was already done and the process was ending when it came
    # (the default handler ends it). Either way the previous checkpoint stays.
    assert code in (130, -signal.SIGINT), out + err
    assert seconds < 30
    assert "interrupted SIGINT step" in out, out + err
    latest = es.latest_step(tmp_path)
    assert latest is not None and latest >= 12
    trainer = make_trainer(tmp_path)  # the next start removes partial saves
    assert not tmp_folders(tmp_path)
    assert int(trainer.state.step) == latest


def test_leftover_temporary_folders_are_removed_at_the_next_start(tmp_path):
    partial = tmp_path / "7.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half-written").write_bytes(b"\0" * 10)
    trainer = make_trainer(tmp_path)
    assert not partial.exists() and int(trainer.state.step) == 0


@pytest.mark.slow
def test_handlers_are_restored_and_only_installed_in_the_main_thread(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    trainer = make_trainer(tmp_path, fallback=False)
    seen = []
    trainer.add_hook(lambda info: seen.append(signal.getsignal(signal.SIGTERM)))
    trainer.train()
    assert seen[0] not in before  # the trainer's own handler during train()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    errors = []
    # In another thread the trainer installs no handler and still trains; an error
    # there leaves `errors` empty (and pytest reports the thread's exception).
    thread = threading.Thread(target=lambda: errors.append(_train_in(tmp_path)))
    thread.start()
    thread.join()
    assert errors == [None]


def _train_in(path):
    make_trainer(path / "thread").train()


@pytest.mark.slow
def test_the_command_reports_sigint_on_one_line_and_resumes_exactly(tmp_path, capsys):
    out = tmp_path / "run"
    p = start(["-m", "eqx_steps", "train", *TINY, "--out", str(out)])
    code, stdout, stderr, _ = signal_when(p, b"\rtrain:", [signal.SIGINT])
    assert code == 130, stdout + stderr
    (line,) = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    step = int(line.split("interrupted at step ")[1].split(";")[0])
    assert line == (
        f"interrupted at step {step}; checkpoint saved; continue with eqx-steps "
        f"train --out {out} --resume"
    )
    assert es.latest_step(out) == step and not tmp_folders(out)
    p = start(["-m", "eqx_steps", "train", "--out", str(out), "--resume"])
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr.decode()
    assert f"Resuming from step {step}: the latest complete checkpoint" in (
        stdout.decode()
    )
    ref = tmp_path / "ref"
    assert cli.main(["train", *TINY, "--out", str(ref)]) == 0
    capsys.readouterr()
    last = [_last_record(d) for d in (out, ref)]
    assert last[0]["step"] == last[1]["step"]
    for k in ("eval_loss", "eval_snr"):
        assert last[0][k] == last[1][k]


def _last_record(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def launch_pair(workdir):
    """A 2-process job (2 CPU devices each) running tests/preempt_worker.py."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    worker = os.path.join(HERE, "preempt_worker.py")
    return [start([worker, str(workdir), "2", str(i), coordinator]) for i in range(2)]


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume(reference, tmp_path):
    p0, p1 = launch_pair(tmp_path)
    # SIGTERM to process 1 only: process 0 learns it at the next call boundary.
    seen = b""
    while b"step 5\n" not in seen:
        chunk = os.read(p1.stdout.fileno(), 4096)
        assert chunk, seen.decode() + p1.stderr.read().decode()
        seen += chunk
    p1.send_signal(signal.SIGTERM)
    outs = []
    for p in (p0, p1):
        out, err = p.communicate(timeout=120)
        outs.append(out.decode() + err.decode())
    outs[1] = seen.decode() + outs[1]
    assert [p0.returncode, p1.returncode] == [143, 143], outs
    steps = {int(o.split("interrupted SIGTERM step ")[1].split()[0]) for o in outs}
    (stopped,) = steps  # the same step in both processes
    assert es.latest_step(tmp_path) == stopped and not tmp_folders(tmp_path)
    state, _ = make_trainer(tmp_path).train()  # resumed here, on 4 devices
    final = host_leaves(state.model)
    for a, b in zip(reference, final):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

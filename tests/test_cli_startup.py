"""Start-up of the command: `--help` and argument errors import no JAX.

`import eqx_steps` loads its names on first use, and the command's parser needs
none of them, so `eqx-steps --help` and a bad option answer at once (no timing
here: which modules a fresh process imported is what can be checked).
"""

import os
import subprocess
import sys

import pytest

import eqx_steps


HEAVY = ("jax", "jaxlib", "equinox", "optax", "orbax", "matplotlib")

_PROBE = """
import sys
from eqx_steps.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules), code)
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["train", "--epochs", "abc"],
     ["denoise", "--help"], ["info", "/nonexistent/run"]],
    ids=["help", "train-help", "bad-option", "denoise-help", "missing-run"],
)  # fmt: skip
def test_help_and_argument_errors_import_no_jax(argv):
    code = _PROBE.format(argv=argv, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    line = [s for s in out.stdout.splitlines() if s.startswith("HEAVY")][-1]
    assert line.startswith("HEAVY []"), (line, out.stderr[-2000:])
    assert line.endswith(" 0" if "--help" in argv else " 2")


def test_every_public_name_loads():
    names = [n for n in dir(eqx_steps) if not n.startswith("_")]
    assert {"TrainState", "parallel_train_step", "models", "platform"} <= set(names)
    for name in names:
        assert getattr(eqx_steps, name) is not None, name
    assert eqx_steps.TrainState is eqx_steps.state.TrainState
    with pytest.raises(AttributeError, match="no_such_name"):
        eqx_steps.no_such_name  # noqa: B018  # pyright: ignore


def test_compilation_cache_folder(monkeypatch, tmp_path):
    from eqx_steps.cli import runs

    monkeypatch.delenv("EQX_STEPS_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runs.compilation_cache_dir(None) == str(tmp_path / "eqx_steps" / "jax")
    monkeypatch.setenv("EQX_STEPS_COMPILATION_CACHE", str(tmp_path / "env"))
    assert runs.compilation_cache_dir(None) == str(tmp_path / "env")
    # The option wins over the environment; 'off' turns the cache off.
    assert runs.compilation_cache_dir(str(tmp_path / "opt")) == str(tmp_path / "opt")
    assert runs.compilation_cache_dir("off") is None
    monkeypatch.setenv("EQX_STEPS_COMPILATION_CACHE", "off")
    assert runs.compilation_cache_dir(None) is None


TINY = [
    "--depth", "2", "--filters", "4", "--patch", "8", "--train-size", "8",
    "--test-size", "8", "--batch-size", "8", "--epochs", "1", "--devices", "1",
]  # fmt: skip


@pytest.mark.slow
def test_train_fills_and_reuses_the_compilation_cache(tmp_path):
    cache = tmp_path / "cache"
    # As a user runs it: without the tests' minimum compile time for a cache entry.
    env = dict(os.environ)
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    for run in ("a", "b"):
        out = subprocess.run(
            [sys.executable, "-m", "eqx_steps", "train", *TINY,
             "--out", str(tmp_path / run), "--compilation-cache", str(cache)],
            capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        if run == "a":
            entries = set(os.listdir(cache))
            assert entries  # the compiled programs
    # The second run compiled the same programs: read back, none added.
    assert set(os.listdir(cache)) == entries
    off = subprocess.run(
        [sys.executable, "-m", "eqx_steps", "train", *TINY,
         "--out", str(tmp_path / "c"), "--compilation-cache", "off"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "EQX_STEPS_COMPILATION_CACHE": str(tmp_path / "unused"),
             "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax")},
    )  # fmt: skip
    # Off is off: neither the command's folder nor the one JAX's variable names.
    assert off.returncode == 0, off.stderr[-3000:]
    assert not (tmp_path / "unused").exists() and not (tmp_path / "jax").exists()


def test_info_reads_the_model_not_the_optimizer_state(tmp_path, capsys, monkeypatch):
    import eqx_steps.apply
    from eqx_steps import cli, parameter_overview
    from eqx_steps.cli import runs

    out = str(tmp_path / "run")
    args = [*TINY[:-1], "4", "--depth", "3", "--out", out]  # 4 devices, a block
    assert cli.main(["train", *args]) == 0
    capsys.readouterr()
    # The whole state, restored as `evaluate` restores it, to compare with.
    full = runs.restore_run(out)
    assert full is not None

    def refuse(*args, **kwargs):
        raise AssertionError("info restored the whole state")

    monkeypatch.setattr(eqx_steps.apply, "checkpoint_restore", refuse)
    assert cli.main(["info", out]) == 0
    printed = capsys.readouterr().out
    assert f"Parameters at checkpoint step {int(full.step)}:" in printed
    assert parameter_overview(full.model) in printed
    assert parameter_overview(full.model_state) in printed

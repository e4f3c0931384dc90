"""`eqx_steps.tensorboard_hook` and `eqx-steps train --tensorboard`: the event
files read back record by record."""

import contextlib
import io
import json
import pathlib
import struct
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import eqx_steps as es
from eqx_steps import cli


def _events(logdir: pathlib.Path) -> list:
    """Every event of the event files in `logdir` (TFRecord framing: length,
    its CRC, the data, its CRC)."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return events


def _scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for e in _events(logdir):
        for v in e.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out


def _texts(logdir: pathlib.Path) -> dict[str, str]:
    return {
        v.tag: v.tensor.string_val[0].decode()
        for e in _events(logdir)
        for v in e.summary.value
        if v.HasField("tensor") and v.tensor.string_val
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with the hook: (logdir, history, config)."""
    logdir = tmp_path_factory.mktemp("tb")
    model = eqx.nn.MLP(4, 4, 8, 1, key=jax.random.key(0))
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    config = {"num_epochs": 3, "batch_size": 8, "log_every_steps": 4}
    trainer = es.BasicTrainer(config, model, {"image": x, "label": x}, {
        "image": x[:8], "label": x[:8]
    })  # fmt: skip
    with es.tensorboard_hook(logdir, trainer.history, config=config) as hook:
        trainer.add_hook(hook, every=trainer.log_every_steps)
        _, history = trainer.train()
        hook.add_image("ramp", np.linspace(0, 1, 30).reshape(5, 6), 12)
    return logdir, history, config


@pytest.mark.slow  # the fixture compiles and trains
def test_scalars_are_the_history_records(trained):
    logdir, history, _ = trained
    scalars = _scalars(logdir)
    assert {
        "train/loss", "train/snr", "learning_rate", "eval/loss", "eval/snr"
    } <= set(scalars)  # fmt: skip
    keys = set(history.records[-1]) - {"step", "epoch", "time"}
    assert len(scalars) == len(keys)  # one tag per entry of a record
    steps = [r["step"] for r in history.records]
    assert steps == [4, 8, 12]
    for tag, key in (("train/loss", "train_loss"), ("eval/snr", "eval_snr"),
                     ("learning_rate", "train_learning_rate")):  # fmt: skip
        assert sorted(scalars[tag]) == steps
        for r in history.records:
            assert scalars[tag][r["step"]] == pytest.approx(r[key], rel=1e-6)


@pytest.mark.slow
def test_config_and_image_are_written(trained):
    logdir, _, config = trained
    text = _texts(logdir)["config/text_summary"]
    assert json.loads(text.replace("\n    ", "\n")) == config
    (image,) = [
        (e.step, v.image)
        for e in _events(logdir)
        for v in e.summary.value
        if v.HasField("image")
    ]
    step, summary = image
    assert step == 12 and (summary.height, summary.width) == (5, 6)
    assert summary.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_history_each_call_writes_its_train_metrics(tmp_path):
    hook = es.tensorboard_hook(tmp_path)
    for step, loss in ((1, 0.5), (2, [0.25, 0.75])):
        metrics = {"loss": np.asarray(loss), "learning_rate": np.asarray(0.1)}
        hook(es.StepInfo(step, 0, None, metrics, 1))  # type: ignore[arg-type]
    hook.close()
    scalars = _scalars(tmp_path)
    assert scalars["train/loss"] == {1: 0.5, 2: 0.5}
    assert scalars["learning_rate"] == {1: pytest.approx(0.1), 2: pytest.approx(0.1)}


def test_without_tensorboardx_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    for name in [m for m in sys.modules if m == "eqx_steps._tensorboard"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(es, "tensorboard_hook", raising=False)
    with pytest.raises(ImportError, match=r'pip install "eqx_steps\[tensorboard\]"'):
        from eqx_steps import tensorboard_hook  # noqa: F401


@pytest.mark.slow
def test_train_tensorboard_writes_the_run(tmp_path):
    out = tmp_path / "run"
    argv = [
        "train", "--depth", "2", "--filters", "4", "--patch", "8",
        "--train-size", "32", "--test-size", "8", "--batch-size", "8",
        "--epochs", "1", "--out", str(out), "--tensorboard",
    ]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    logdir = out / "tensorboard"
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    scalars = _scalars(logdir)
    assert scalars["eval/snr"] == {
        r["step"]: pytest.approx(r["eval_snr"], rel=1e-6) for r in records
    }
    assert (
        json.loads(_texts(logdir)["config/text_summary"].replace("\n    ", "\n"))[
            "epochs"
        ]
        == 1
    )
    images = [v.tag for e in _events(logdir) for v in e.summary.value if v.image.width]
    assert images == ["samples"]


def test_train_tensorboard_without_tensorboardx_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--out", str(out), "--tensorboard"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert 'pip install "eqx_steps[tensorboard]"' in err
    assert not out.exists()

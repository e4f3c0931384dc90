import dataclasses
import json
import math
import os
import pathlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import leaves_equal, tree_allclose
from hypothesis import given, strategies as st

import eqx_steps as es
from eqx_steps.models import ConvBNNet, DnCNN
from eqx_steps.synthetic import make_denoising_data


@pytest.fixture(scope="module")
def data():
    return make_denoising_data(192, 40, size=16, noise_std=0.1, seed=0)


def small_model(seed=0):
    return eqx.nn.make_with_state(ConvBNNet)(
        depth=2, channels=1, num_filters=8, key=jax.random.key(seed)
    )


def base_config(**changes):
    config = {
        "seed": 0,
        "opt_type": "ADAM",
        "batch_size": 16,
        "num_epochs": 2,
        "base_learning_rate": 1e-2,
        "log_every_steps": 6,
    }
    config.update(changes)
    return config


@pytest.mark.slow
def test_training_improves_the_snr_over_the_noisy_input(data):
    train_ds, test_ds = data
    model, ms = eqx.nn.make_with_state(DnCNN)(
        depth=4, channels=1, num_filters=16, key=jax.random.key(0)
    )
    trainer = es.BasicTrainer(
        base_config(num_epochs=6), model, train_ds, test_ds, model_state=ms
    )
    state, history = trainer.train()
    noisy_snr = float(
        np.mean([es.snr(c, n) for c, n in zip(test_ds["label"], test_ds["image"])])
    )
    final = history.records[-1]
    assert int(state.step) == 6 * (192 // 16)
    assert final["eval_snr"] > noisy_snr + 1.0, (final, noisy_snr)
    assert history.records[0]["train_loss"] > final["train_loss"]
    cols = history.to_dict()
    for key in (
        "epoch",
        "step",
        "time",
        "train_learning_rate",
        "train_loss",
        "train_snr",
        "eval_loss",
        "eval_snr",
    ):
        assert len(cols[key]) == len(history.records)


def test_defaults_equal_scico():
    cfg = es.TrainConfig()
    assert cfg.seed == 0 and cfg.opt_type == "ADAM" and cfg.num_epochs == 10
    assert cfg.batch_size is None  # 2 x device count, as SCICO
    assert cfg.log is False and cfg.checkpointing is False and cfg.workdir == "./"
    assert cfg.lr_schedule is es.create_cnst_lr_schedule
    assert cfg.criterion is es.mse_loss and cfg.metrics_fn is es.compute_metrics
    assert cfg.create_train_state is es.create_basic_train_state
    assert cfg.train_step_fn is es.train_step and cfg.eval_step_fn is es.eval_step


def test_derived_defaults_follow_the_data(data):
    train_ds, test_ds = data
    model, ms = small_model()
    trainer = es.BasicTrainer({}, model, train_ds, test_ds, model_state=ms)
    assert trainer.batch_size == 2 * jax.device_count()
    assert trainer.steps_per_epoch == 192 // 8
    assert trainer.log_every_steps == 20 * trainer.steps_per_epoch
    assert trainer.steps_per_checkpoint == 10 * trainer.steps_per_epoch
    assert trainer.num_steps == 10 * trainer.steps_per_epoch


def test_every_scico_key_is_accepted(tmp_path):
    config = {
        "seed": 1,
        "opt_type": "SGD",
        "momentum": 0.9,
        "batch_size": 8,
        "num_epochs": 1,
        "base_learning_rate": 0.1,
        "lr_decay_rate": 0.9,
        "warmup_epochs": 0,
        "steps_per_eval": 2,
        "log_every_steps": 3,
        "steps_per_checkpoint": 4,
        "log": False,
        "workdir": str(tmp_path),
        "checkpointing": False,
        "return_state": True,
        "lr_schedule": es.create_exp_lr_schedule,
        "criterion": es.mse_loss,
        "create_train_state": es.create_basic_train_state,
        "train_step_fn": es.train_step,
        "eval_step_fn": es.eval_step,
        "metrics_fn": es.compute_metrics,
        "post_lst": [],
    }
    assert set(config) == set(es.ConfigDict.__annotations__) - {
        "backend",
        "steps_per_call",
        "nan_policy",
        "shard_optimizer_state",
        "num_steps",  # the additions beyond SCICO (TrainConfig's docstring)
        "shuffle",
        "input_key",
        "target_key",
    }
    cfg = es.TrainConfig.from_dict(config)
    assert cfg.opt_type == "SGD" and cfg.momentum == 0.9 and cfg.post_lst == ()


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match="'num_epoch'.*did you mean 'num_epochs'"):
        es.TrainConfig.from_dict({"num_epoch": 3})


@pytest.mark.parametrize(
    "key, value",
    [("batch_size", "16"), ("log", 1), ("num_epochs", 2.5), ("criterion", 3)],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(TypeError, match=f"config\\['{key}'\\]"):
        es.TrainConfig.from_dict({key: value})


def test_bad_data_fails_before_training(data):
    train_ds, test_ds = data
    model, ms = small_model()
    with pytest.raises(ValueError, match="batch_size.*not divisible"):
        es.BasicTrainer(
            base_config(batch_size=10), model, train_ds, test_ds, model_state=ms
        )
    with pytest.raises(ValueError, match="'label'"):
        es.BasicTrainer(base_config(), model, {"image": train_ds["image"]}, test_ds)
    short = {"image": train_ds["image"], "label": train_ds["label"][:-3]}
    with pytest.raises(ValueError, match="length"):
        es.BasicTrainer(base_config(), model, short, test_ds, model_state=ms)
    tiny = {k: v[:8] for k, v in train_ds.items()}
    with pytest.raises(ValueError, match="batch"):
        es.BasicTrainer(base_config(), model, tiny, test_ds, model_state=ms)


@pytest.mark.slow
def test_resume_is_bit_identical(data, tmp_path):
    train_ds, test_ds = data

    def run(workdir, num_epochs):
        model, ms = small_model()
        config = base_config(
            num_epochs=num_epochs,
            checkpointing=True,
            workdir=str(workdir),
            steps_per_checkpoint=5,
        )
        return es.BasicTrainer(
            config, model, train_ds, test_ds, model_state=ms
        ).train()[0]

    straight = run(tmp_path / "a", 2)
    first = run(tmp_path / "b", 1)
    assert int(first.step) == 12
    resumed = run(tmp_path / "b", 2)
    assert int(resumed.step) == 24
    assert leaves_equal(resumed, straight)


@pytest.mark.slow
def test_log_prints_overview_and_writes_metrics(data, tmp_path, capsys):
    train_ds, test_ds = data
    model, ms = small_model()
    config = base_config(num_epochs=1, log=True, workdir=str(tmp_path))
    _, history = es.BasicTrainer(
        config, model, train_ds, test_ds, model_state=ms
    ).train()
    out = capsys.readouterr().out
    assert (
        "Network Structure" in out
        and "Total weights:" in out
        and "Batch Normalization" in out
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history.records
    history.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_only_apply_and_only_evaluate(data, tmp_path):
    train_ds, test_ds = data
    model, ms = small_model()
    config = base_config(num_epochs=1, checkpointing=True, workdir=str(tmp_path))
    state, _ = es.BasicTrainer(config, model, train_ds, test_ds, model_state=ms).train()
    # 40 examples, batch 16: the last partial batch counts too.
    out, _ = es.only_apply(config, model, test_ds, model_state=ms, workdir=tmp_path)
    assert out.shape == test_ds["image"].shape
    inference = eqx.nn.inference_mode(state.model)
    by_hand = np.stack(
        [
            np.asarray(es.per_example(inference, state.model_state, x[None])[0][0])
            for x in test_ds["image"]
        ]
    )
    np.testing.assert_allclose(out, by_hand, rtol=1e-5, atol=1e-6)
    metrics = es.only_evaluate(config, model, test_ds, model_state=ms, workdir=tmp_path)

    # SCICO's definition: compute_metrics per device (16 = 4 devices x 4), averaged
    # over devices and batches; the last 8 as one batch, weighted by their count.
    def batch_metrics(rows):
        m = es.compute_metrics(jnp.asarray(by_hand[rows]), test_ds["label"][rows])
        return np.array([float(m["loss"]), float(m["snr"])])

    full = [
        np.mean([batch_metrics(slice(s, s + 4)) for s in range(b, b + 16, 4)], 0)
        for b in (0, 16)
    ]
    want = (16 * full[0] + 16 * full[1] + 8 * batch_metrics(slice(32, 40))) / 40
    np.testing.assert_allclose([metrics["loss"], metrics["snr"]], want, rtol=1e-4)
    # Given weights directly, no checkpoint is needed.
    direct, _ = es.only_apply(
        config,
        state.model,
        test_ds,
        model_state=state.model_state,
        use_checkpoint=False,
    )
    np.testing.assert_allclose(direct, out, rtol=1e-6)


def test_only_apply_without_checkpoint_says_so(data, tmp_path):
    _, test_ds = data
    model, ms = small_model()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        es.only_apply(base_config(), model, test_ds, model_state=ms, workdir=tmp_path)


def test_train_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        es.TrainConfig().seed = 3  # pyright: ignore
    assert os.fspath(es.TrainConfig.from_dict({"workdir": "x"}).workdir) == "x"


# ---------------------------------------------------------------------------
# Small vector tasks: fast to compile, for the loop's own behaviour.

_RNG = np.random.default_rng(0)
_X = _RNG.standard_normal((80, 6)).astype(np.float32)
_W = _RNG.standard_normal((6, 3)).astype(np.float32)
REGRESSION = {"image": _X[:64], "label": _X[:64] @ _W}
REGRESSION_TEST = {"image": _X[64:], "label": _X[64:] @ _W}
CLASSES = {"image": _X[:64], "label": np.argmax(_X[:64] @ _W, -1)}
CLASSES_TEST = {"image": _X[64:], "label": np.argmax(_X[64:] @ _W, -1)}


def linear(seed=0):
    return eqx.nn.Linear(6, 3, key=jax.random.key(seed))


def vector_config(**changes):
    # 64 examples, batch 16: 4 steps per epoch.
    config = {"batch_size": 16, "num_epochs": 2, "log_every_steps": 4}
    config.update(changes)
    return config


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy_metrics(output, labels, criterion=cross_entropy):
    hits = (jnp.argmax(output, -1) == labels).astype(jnp.float32)
    return {"loss": criterion(output, labels), "accuracy": jnp.mean(hits)}


def test_hooks_run_at_their_points_with_a_step_info():
    trainer = es.BasicTrainer(
        vector_config(num_epochs=3), linear(), REGRESSION, REGRESSION_TEST
    )
    every_call, every_five = [], []
    trainer.add_hook(every_call.append)

    @trainer.add_hook(every=5)
    def five(info):
        assert isinstance(info, es.StepInfo)
        # The History's record of a log point is there before user hooks run.
        records = trainer.history.records
        every_five.append((info.step, info.epoch, records[-1]["step"]))

    state, history = trainer.train()
    assert [i.step for i in every_call] == list(range(1, 13))
    assert {i.steps for i in every_call} == {1}
    assert every_call[-1].state is state
    assert set(every_call[0].metrics) >= {"loss", "snr", "learning_rate"}
    # Multiples of 5, then the last step; epoch = step // steps_per_epoch.
    assert every_five == [(5, 1, 4), (10, 2, 8), (12, 3, 12)]
    assert [r["step"] for r in history.records] == [4, 8, 12]
    with pytest.raises(ValueError, match="`every`"):
        trainer.add_hook(print, every=0)
    with pytest.raises(TypeError, match="`every`"):
        trainer.add_hook(print, every=True)
    with pytest.raises(TypeError, match="`fn`"):
        trainer.add_hook(3)  # pyright: ignore


def test_steps_per_call_stops_exactly_at_log_and_checkpoint_points(tmp_path):
    def run(k, workdir):
        config = vector_config(
            num_epochs=3,
            log_every_steps=5,
            steps_per_call=k,
            checkpointing=True,
            steps_per_checkpoint=6,
            workdir=str(workdir),
        )
        trainer = es.BasicTrainer(config, linear(), REGRESSION, REGRESSION_TEST)
        calls = []
        trainer.add_hook(lambda info: calls.append((info.step, info.steps)))
        state, history = trainer.train()
        return state, history, calls

    single, history_1, _ = run(1, tmp_path / "one")
    stacked, history_3, calls = run(3, tmp_path / "three")
    # Three steps per call, single steps up to 5, 6, 10 and 12.
    assert calls == [(3, 3), (4, 1), (5, 1), (6, 1), (9, 3), (10, 1), (11, 1), (12, 1)]
    assert [r["step"] for r in history_3.records] == [5, 10, 12]
    assert es.latest_step(tmp_path / "three") == 12
    steps = sorted(int(d) for d in os.listdir(tmp_path / "three") if d.isdigit())
    assert steps == [6, 12]
    assert tree_allclose(stacked.model, single.model, rtol=1e-6, atol=1e-7)
    for a, b in zip(history_3.records, history_1.records):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)


def test_metrics_jsonl_is_appended_and_resumes_with_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"

    def run(num_epochs):
        config = vector_config(
            num_epochs=num_epochs,
            log=True,
            checkpointing=True,
            workdir=str(tmp_path),
            log_every_steps=2,
            steps_per_checkpoint=4,
        )
        return es.BasicTrainer(config, linear(), REGRESSION, REGRESSION_TEST).train()

    _, first = run(1)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == first.records
    inode = path.stat().st_ino
    # A crash after the checkpoint of step 4: records of later steps, and a line
    # cut short, are in the file; resuming from step 4 removes them.
    with open(path, "a") as f:
        f.write(json.dumps({**first.records[-1], "step": 6}) + "\n")
        f.write('{"epoch": 1, "st')
    _, second = run(2)
    assert path.stat().st_ino == inode  # appended to, never replaced
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    # The resumed history starts with the file's records up to the checkpoint.
    assert [r["step"] for r in second.records] == [2, 4, 6, 8]
    assert second.records == [
        json.loads(line) for line in path.read_text().splitlines()
    ]
    # The trainer writes no config.json: the config lives in each checkpoint.
    assert not (tmp_path / "config.json").exists()
    stored = es.load_config(tmp_path)
    assert stored["batch_size"] == 16 and stored["num_epochs"] == 2
    assert "criterion" not in stored  # functions are not JSON


def test_a_classifier_shows_its_own_metrics(tmp_path, capsys):
    config = vector_config(
        num_epochs=3,
        base_learning_rate=0.1,
        criterion=cross_entropy,
        metrics_fn=accuracy_metrics,
        log=True,
        workdir=str(tmp_path),
    )
    _, history = es.BasicTrainer(config, linear(), CLASSES, CLASSES_TEST).train()
    out = capsys.readouterr().out
    assert history.metrics == ["loss", "accuracy"]
    assert {k for r in history.records for k in r} - {"train_nonfinite"} == {
        "epoch",
        "step",
        "time",
        "train_learning_rate",
        "train_loss",
        "train_accuracy",
        "eval_loss",
        "eval_accuracy",
    }
    assert "accuracy" in out and "snr" not in out.lower() and "nan" not in out
    assert history.records[-1]["train_loss"] < history.records[0]["train_loss"]
    assert history.records[-1]["eval_accuracy"] >= 0.75  # of 16 test examples
    assert history.plot(tmp_path / "curves.png") == ["loss", "accuracy"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_history_as_scico_returns_it(tmp_path):
    history = es.History()
    assert history.plot(tmp_path / "empty.png") == []  # a figure that says so
    assert (tmp_path / "empty.png").is_file()
    for step in (2, 4):
        history.append(
            {
                "epoch": step // 2,
                "step": step,
                "time": 0.1 * step,
                "train_learning_rate": 0.01,
                "train_loss": 1.0 / step,
                "train_snr": float(step),
                "eval_loss": 2.0 / step,
                "eval_snr": math.nan,  # no finite value: no panel
            }
        )
    records = history.history()
    assert len(records) == 2 and records[1].Train_Loss == 0.25
    assert records[0]._fields == (
        "Epoch",
        "Step",
        "Time",
        "Train_LR",
        "Train_Loss",
        "Train_SNR",
        "Eval_Loss",
        "Eval_SNR",
    )
    columns = history.history(transpose=True)
    assert isinstance(columns.Eval_Loss, np.ndarray)
    np.testing.assert_array_equal(columns.Step, [2, 4])
    np.testing.assert_array_equal(columns.Eval_Loss, [1.0, 0.5])
    assert history.metrics == ["loss", "snr"]
    assert history.plot(tmp_path / "curves.png") == ["loss", "snr"]
    history.records[1]["train_snr"] = history.records[0]["train_snr"] = math.nan
    assert history.plot(tmp_path / "curves.png") == ["loss"]


def test_scico_attributes_and_return_state(tmp_path):
    config = vector_config(num_epochs=1, return_state=False)
    trainer = es.BasicTrainer(config, linear(), REGRESSION, REGRESSION_TEST)
    assert trainer.ishape == (6,)
    assert trainer.steps_per_epoch == 4
    first = next(trainer.eval_dt_iter)
    np.testing.assert_array_equal(
        np.asarray(first["image"]).reshape(16, 6), REGRESSION_TEST["image"]
    )
    assert trainer.train_dt_iter.step == 0
    (model, model_state), history = trainer.train()
    assert model_state is None and isinstance(model, eqx.nn.Linear)
    assert eqx.tree_equal(model, trainer.state.model)
    assert len(history.records) == 1


@pytest.mark.slow
def test_model_keywords_key_trainable_forward(tmp_path):
    class Dropped(eqx.Module):
        linear: eqx.nn.Linear
        dropout: eqx.nn.Dropout

        def __call__(self, x, *, key=None):
            return self.linear(self.dropout(x, key=key))

    class Batched(eqx.Module):
        linear: eqx.nn.Linear

        def __call__(self, x):
            return jax.vmap(self.linear)(x)

    config = vector_config(num_epochs=1)
    dropped = Dropped(linear(), eqx.nn.Dropout(0.5))
    with pytest.raises(RuntimeError, match="key"):
        es.BasicTrainer(config, dropped, REGRESSION, REGRESSION_TEST).train()
    runs = [
        es.BasicTrainer(
            config, dropped, REGRESSION, REGRESSION_TEST, key=jax.random.key(k)
        ).train()[0]
        for k in (1, 1, 2)
    ]
    assert eqx.tree_equal(runs[0].model, runs[1].model)
    assert not eqx.tree_equal(runs[0].model, runs[2].model)

    frozen = eqx.tree_at(
        lambda m: m.bias, jax.tree_util.tree_map(eqx.is_inexact_array, linear()), False
    )
    state, _ = es.BasicTrainer(
        config, linear(), REGRESSION, REGRESSION_TEST, trainable=frozen
    ).train()
    np.testing.assert_array_equal(state.model.bias, linear().bias)
    assert not np.array_equal(state.model.weight, linear().weight)

    plain, _ = es.BasicTrainer(config, linear(), REGRESSION, REGRESSION_TEST).train()
    batched, _ = es.BasicTrainer(
        config, Batched(linear()), REGRESSION, REGRESSION_TEST, forward=es.whole_batch
    ).train()
    assert tree_allclose(batched.model.linear, plain.model, rtol=1e-6)


def test_a_ready_optimizer_and_a_float_schedule():
    sgd = vector_config(num_epochs=1, opt_type="SGD", base_learning_rate=0.05)
    by_config, by_config_history = es.BasicTrainer(
        sgd, linear(), REGRESSION, REGRESSION_TEST
    ).train()
    # opt_type and base_learning_rate are not used; the rate is read from `tx`.
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.05)
    config = vector_config(num_epochs=1, opt_type="ADAMW", base_learning_rate=1.0)
    state, history = es.BasicTrainer(
        config, linear(), REGRESSION, REGRESSION_TEST, tx=tx
    ).train()
    assert tree_allclose(state.model, by_config.model, rtol=1e-6)
    assert state.tx is tx
    assert history.records[-1]["train_learning_rate"] == pytest.approx(0.05)
    # A config's lr_schedule may return a plain number.
    floats = vector_config(num_epochs=1, opt_type="SGD", lr_schedule=lambda c: 0.05)
    state, history = es.BasicTrainer(
        floats, linear(), REGRESSION, REGRESSION_TEST
    ).train()
    assert tree_allclose(state.model, by_config.model, rtol=1e-6)
    assert history.records == [
        {**r, "time": history.records[0]["time"]} for r in by_config_history.records
    ]
    with pytest.raises(TypeError, match="lr_schedule"):
        es.BasicTrainer(
            vector_config(lr_schedule=lambda c: "fast"),
            linear(),
            REGRESSION,
            REGRESSION_TEST,
        )


# ---------------------------------------------------------------------------
# TrainConfig from its annotations

_VALID = {
    "seed": st.integers(-5, 5),
    "momentum": st.one_of(st.none(), st.floats(0, 1), st.integers(0, 1)),
    "batch_size": st.one_of(st.none(), st.integers(1, 64)),
    "num_epochs": st.integers(1, 9),
    "base_learning_rate": st.floats(0, 1),
    "warmup_epochs": st.integers(0, 3),
    "log": st.booleans(),
    "workdir": st.sampled_from(["run", pathlib.Path("a") / "b"]),
    "post_lst": st.one_of(st.none(), st.lists(st.just(abs), max_size=2)),
    "backend": st.sampled_from(["pmap", "sharded"]),
    "nan_policy": st.sampled_from(["raise", "skip", "ignore"]),
}


@given(st.fixed_dictionaries({}, optional=_VALID))
def test_valid_configs_round_trip(config):
    cfg = es.TrainConfig.from_dict(config)
    assert es.TrainConfig.from_dict(cfg.to_dict()) == cfg
    for key, value in config.items():
        got = getattr(cfg, key)
        if key == "workdir":
            assert got == os.fspath(value) and isinstance(got, str)
        elif key == "post_lst" and value is not None:
            assert got == tuple(value)
        else:
            assert got == value


@pytest.mark.parametrize(
    "key, value, error, words",
    [
        ("batch_size", 0, ValueError, ">= 1"),
        ("warmup_epochs", -1, ValueError, ">= 0"),
        ("base_learning_rate", -0.1, ValueError, ">= 0"),
        ("momentum", float("nan"), ValueError, "finite"),
        ("seed", True, TypeError, "int"),
        ("momentum", "0.9", TypeError, "float or None"),
        ("workdir", 3, TypeError, "str or os.PathLike"),
        ("backend", "pjit", ValueError, "'pmap', 'sharded'"),
        ("nan_policy", "skipp", ValueError, "did you mean 'skip'"),
        ("post_lst", [abs, 3], TypeError, r"config\['post_lst'\]\[1\]"),
        ("post_lst", abs, TypeError, "list of functions"),
    ],
)
def test_bad_values_are_named_from_the_annotations(key, value, error, words):
    with pytest.raises(error, match=f"config\\['{key}'\\]") as info:
        es.TrainConfig.from_dict({key: value})
    assert re.search(words, str(info.value)), str(info.value)


def test_every_way_of_making_a_config_is_validated():
    with pytest.raises(ValueError, match=r"config\['batch_size'\] must be .*>= 1"):
        es.TrainConfig(batch_size=0)
    with pytest.raises(TypeError, match=r"config\['log'\]"):
        dataclasses.replace(es.TrainConfig(), log="yes")  # pyright: ignore
    assert es.TrainConfig(workdir=pathlib.Path("x")).workdir == "x"
    # SCICO's trainer writes steps_per_epoch back into its config dict.
    assert es.TrainConfig.from_dict({"steps_per_epoch": 3}) == es.TrainConfig()

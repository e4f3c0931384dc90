import dataclasses
import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import leaves_equal

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


def test_log_prints_overview_and_writes_metrics(data, tmp_path, capsys):
    train_ds, test_ds = data
    model, ms = small_model()
    config = base_config(num_epochs=1, log=True, workdir=str(tmp_path))
    _, history = es.BasicTrainer(
        config, model, train_ds, test_ds, model_state=ms
    ).train()
    out = capsys.readouterr().out
    assert (
        "Network Structure" in out and "Total:" in out and "Batch Normalization" in out
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history.records
    history.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


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

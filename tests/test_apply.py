"""`only_apply` and `only_evaluate`: SCICO's rule for the weights, one output per
example through the parallel evaluation path, clear errors."""

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import leaves_equal

import eqx_steps as es
from eqx_steps.models import ConvBNNet
from eqx_steps.synthetic import make_denoising_data


N_DEVICES = 4


def template(seed=0):
    return eqx.nn.make_with_state(ConvBNNet)(
        depth=2, channels=1, num_filters=4, key=jax.random.key(seed)
    )


def scico_config(workdir, **changes):
    return {
        "seed": 0,
        "batch_size": 16,
        "num_epochs": 1,
        "base_learning_rate": 1e-2,
        "checkpointing": True,
        "workdir": str(workdir),
        **changes,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SCICO-style run: a config dict with checkpointing, BasicTrainer, train()."""
    workdir = tmp_path_factory.mktemp("run")
    # 20 test examples, batches of 16: one full batch and a remainder of 4.
    train_ds, test_ds = make_denoising_data(48, 20, size=8, noise_std=0.1, seed=0)
    model, model_state = template()
    config = scico_config(workdir)
    state, _ = es.BasicTrainer(
        config, model, train_ds, test_ds, model_state=model_state
    ).train()
    return config, state, test_ds


@eqx.filter_jit
def apply_directly(model, model_state, x):
    return es.per_example(model, model_state, x, inference=True)[0]


def test_a_scico_script_gets_the_trained_models_outputs(trained, capsys):
    config, state, test_ds = trained
    model, model_state = template()  # untrained: the checkpoint gives the weights
    output, (used, used_state) = es.only_apply(
        config, model, test_ds, model_state=model_state
    )
    assert f"restored checkpoint step {int(state.step)}" in capsys.readouterr().err
    assert leaves_equal((used, used_state), (state.model, state.model_state))
    want = apply_directly(state.model, state.model_state, test_ds["image"])
    assert output.shape == test_ds["image"].shape
    np.testing.assert_allclose(output, want, rtol=1e-5, atol=1e-6)
    untrained = apply_directly(model, model_state, test_ds["image"])
    assert not np.allclose(output, untrained, atol=1e-3)


@pytest.mark.slow
def test_given_weights_are_used_when_asked_or_without_checkpointing(trained, capsys):
    config, state, test_ds = trained
    model, model_state = template(seed=1)
    want = apply_directly(model, model_state, test_ds["image"])
    for kwargs, cfg in [
        ({"use_checkpoint": False}, config),
        ({}, {**config, "checkpointing": False}),
    ]:
        output, (used, _) = es.only_apply(
            cfg, model, test_ds, model_state=model_state, **kwargs
        )
        np.testing.assert_allclose(output, want, rtol=1e-5, atol=1e-6)
        assert used is model
    assert "restored" not in capsys.readouterr().err


def test_workdir_names_the_checkpoint_folder(trained):
    config, state, test_ds = trained
    model, model_state = template()
    _, (used, _) = es.only_apply(
        {"batch_size": 8},  # no checkpointing in the config
        model,
        test_ds,
        model_state=model_state,
        workdir=config["workdir"],
    )
    assert leaves_equal(used, state.model)


def test_only_evaluate_is_scico_definition_on_the_restored_weights(trained):
    config, state, test_ds = trained
    model, model_state = template()
    metrics = es.only_evaluate(config, model, test_ds, model_state=model_state)
    output = np.asarray(
        apply_directly(state.model, state.model_state, test_ds["image"]), np.float64
    )
    label = test_ds["label"].astype(np.float64)

    def by_hand(rows):
        err = np.mean((output[rows] - label[rows]) ** 2)
        return np.array([0.5 * err, 10 * np.log10(np.var(label[rows]) / err)])

    # One batch of 16 over 4 devices (4 each), then the remaining 4 on one device.
    full = np.mean([by_hand(np.arange(4 * d, 4 * d + 4)) for d in range(4)], axis=0)
    want = (16 * full + 4 * by_hand(np.arange(16, 20))) / 20
    np.testing.assert_allclose([metrics["loss"], metrics["snr"]], want, rtol=1e-4)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    model, model_state = template()
    _, test_ds = make_denoising_data(8, 4, size=8, seed=0)
    with pytest.raises(FileNotFoundError) as info:
        es.only_apply(scico_config(tmp_path), model, test_ds, model_state=model_state)
    message = str(info.value)
    assert "config['workdir']" in message and str(tmp_path) in message
    assert "use_checkpoint=False" in message
    with pytest.raises(FileNotFoundError, match="use_checkpoint=False"):
        es.only_evaluate(
            scico_config(tmp_path), model, test_ds, model_state=model_state
        )


def test_a_batchnorm_model_without_model_state_names_it(tmp_path):
    model, _ = template()
    _, test_ds = make_denoising_data(8, 4, size=8, seed=0)
    for fn in (es.only_apply, es.only_evaluate):
        with pytest.raises(ValueError, match="`model_state` is None.*make_with_state"):
            fn({"batch_size": 8}, model, test_ds)


@pytest.mark.parametrize("backend", ["pmap", "sharded"])
@pytest.mark.parametrize("n", [3, 8, 37])
def test_one_output_per_example_in_order(backend, n):
    model = eqx.nn.MLP(3, 2, 8, 1, key=jax.random.key(0))
    x = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
    config = {"batch_size": 8, "backend": backend}
    output, (used, used_state) = es.only_apply(config, model, {"image": x})
    assert used is model and used_state is None
    np.testing.assert_allclose(output, jax.vmap(model)(x), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named(tmp_path):
    model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    x = np.zeros((8, 3), np.float32)
    with pytest.raises(ValueError, match="`test_ds`.*'image'"):
        es.only_apply({}, model, {"input": x})
    with pytest.raises(TypeError, match="`test_ds`"):
        es.only_apply({}, model, x)
    with pytest.raises(ValueError, match="`test_ds`.*'label'"):
        es.only_evaluate({}, model, {"image": x})
    with pytest.raises(TypeError, match="`use_checkpoint`"):
        es.only_apply({}, model, {"image": x}, use_checkpoint="yes")
    with pytest.raises(ValueError, match="`workdir`.*`use_checkpoint` is False"):
        es.only_apply({}, model, {"image": x}, workdir=tmp_path, use_checkpoint=False)
    with pytest.raises(ValueError, match="config\\['batch_size'\\] = 6"):
        es.only_apply({"batch_size": 6}, model, {"image": x})

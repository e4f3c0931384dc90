"""The fast XLA:CPU setting the library compiles its own programs with.

Without `XLA_FLAGS`, XLA:CPU of jaxlib 0.10 runs convolutions ~3.5x slower
(docs/performance.md); the parallel steps, evaluation and `denoise_image` turn
the experimental fusion off per compilation, so a user needs no flag. Speed is
measured in benchmarks/readme_snippet.py; here, that the option is chosen as
documented and that XLA compiles and runs the library's programs with it.
"""

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import eqx_steps as es
from eqx_steps import platform
from eqx_steps.denoise import denoise_image
from eqx_steps.models import DnCNN


YNN = "xla_cpu_experimental_ynn_fusion_type"
NEW_JAXLIB = platform.jaxlib_version() >= (0, 10)


def test_compiler_options_cpu_only_and_the_users_choice_wins(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    expected = {YNN: "LIBRARY_FUSION_TYPE_REDUCE"} if NEW_JAXLIB else None
    assert platform.compiler_options("cpu") == expected
    # Nothing is added on other platforms: a GPU or TPU compiles as before.
    assert platform.compiler_options("gpu") is None
    assert platform.compiler_options("tpu", {"a": 1}) == {"a": 1}
    # The caller's options are kept, and win over the library's choice.
    mine = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}
    assert platform.compiler_options("cpu", mine) == {**mine, **(expected or {})}
    assert platform.compiler_options("cpu", {YNN: "default"}) == {YNN: "default"}
    assert mine == {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}  # a copy
    # XLA_FLAGS naming the option is the user's choice: nothing is added.
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=default")
    assert platform.compiler_options("cpu") is None


@pytest.fixture(scope="module")
def dncnn():
    model, model_state = eqx.nn.make_with_state(DnCNN)(
        depth=2, channels=1, num_filters=4, key=jax.random.key(0)
    )
    return model, model_state


def test_library_programs_compile_with_the_option_without_flags(monkeypatch, dncnn):
    # As for a user who set no XLA_FLAGS: the library adds the option itself, and
    # XLA accepts it per compilation (here after the backends started).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    model, model_state = dncnn
    state = es.TrainState.create(model, optax.adam(1e-3), model_state=model_state)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype(np.float32)
    batch = es.shard({"image": x, "label": x})
    step = es.parallel_train_step(1e-3, es.mse_loss, es.compute_metrics)
    evaluate = es.parallel_eval_step(es.mse_loss, es.compute_metrics)
    expected = {YNN: "LIBRARY_FUSION_TYPE_REDUCE"} if NEW_JAXLIB else None
    assert step.compiler_options == expected  # pyright: ignore[reportAttributeAccessIssue]
    assert evaluate.compiler_options == expected  # pyright: ignore[reportAttributeAccessIssue]
    new, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
    assert np.isfinite(float(evaluate(new, batch)["loss"]))
    # The denoiser's compiled call (one device, the default backend).
    y = denoise_image(model, model_state, x[0, :, :, 0], tile=None)
    assert y.shape == (8, 8) and np.isfinite(y).all()


def test_users_options_reach_the_step_with_the_libraries():
    mine = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}
    step = es.parallel_train_step(
        1e-3, es.mse_loss, es.compute_metrics, compiler_options=mine
    )
    assert step.compiler_options == platform.compiler_options("cpu", mine)  # pyright: ignore[reportAttributeAccessIssue]

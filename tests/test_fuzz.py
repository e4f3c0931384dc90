"""Fuzzing of the public entry points: random shapes, dtypes, keys, config values and
sizes either work or raise one of the library's documented errors, raised by the
library itself (the raising frame is inside `eqx_steps/`), never an exception from
inside JAX, Equinox, optax or orbax (issue 15, item 5)."""

import contextlib
import functools
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ADAM, bn_net, loss_metrics, lr_fn, mlp, mse
from hypothesis import given, settings, strategies as st

import eqx_steps as es
from eqx_steps import cli


LIBRARY = os.path.dirname(os.path.abspath(es.__file__)) + os.sep
DOCUMENTED = (
    TypeError,
    ValueError,
    KeyError,  # a schedule's missing config key, named
    FileNotFoundError,
    NotImplementedError,
    es.NonFiniteStepError,
)


@pytest.fixture(autouse=True)
def _whole_tracebacks():
    # JAX hides its own frames from tracebacks; the check needs to see them.
    before = jax.config.jax_traceback_filtering
    jax.config.update("jax_traceback_filtering", "off")
    yield
    jax.config.update("jax_traceback_filtering", before)


def raising_file(error: BaseException) -> str:
    """The file of the frame that raised `error` (the traceback's last frame)."""
    tb = error.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename)


def attempt(fn):
    """`fn()`, or `None` when it raised a documented error from the library."""
    try:
        return fn()
    except DOCUMENTED as e:
        where = raising_file(e)
        assert where.startswith(LIBRARY), (
            f"{type(e).__name__} raised from {where}, not by eqx_steps:\n"
            + "".join(traceback.format_exception(e))
        )
        assert str(e), f"{type(e).__name__} without a message"
        return None


# --- TrainState.create --------------------------------------------------------------

MODELS = {
    "mlp": lambda: (mlp(), None),
    "bn": bn_net,
    "params": lambda: ({"w": jnp.ones((4, 2))}, None),
    "none": lambda: (None, None),
}


@settings(max_examples=12)
@given(
    model=st.sampled_from(sorted(MODELS)),
    state_of=st.sampled_from(["own", "none", "bn", "dict"]),
    key=st.sampled_from([None, "key", "raw", 3, "vector"]),
    tx=st.sampled_from(["adam", "string"]),
)
def test_create(model, state_of, key, tx):
    built, own = MODELS[model]()
    model_state = {"own": own, "none": None, "bn": bn_net()[1], "dict": {}}[state_of]
    keys = {
        "key": jax.random.key(0),
        "raw": jax.random.PRNGKey(0),
        "vector": jnp.zeros(3),
    }
    attempt(
        lambda: es.TrainState.create(
            built,
            ADAM if tx == "adam" else "adam",
            model_state=model_state,
            key=keys.get(key, key),  # pyright: ignore
        )
    )


# --- parallel_train_step ------------------------------------------------------------


@functools.cache
def train_step(**options):
    return attempt(lambda: es.parallel_train_step(lr_fn, mse, loss_metrics, **options))


@functools.cache
def mlp_state():
    return es.TrainState.create(mlp(), ADAM)


@settings(max_examples=15)
@given(
    backend=st.sampled_from(["pmap", "sharded", "mpi"]),
    steps_per_call=st.sampled_from([1, 2, 0, "1"]),
    nan_policy=st.sampled_from(["raise", "skip", "nan"]),
    n=st.sampled_from([8, 6, 0]),
    features=st.sampled_from([4, 3]),
    dtype=st.sampled_from(["float32", "float16", "uint8", "int32", "bool"]),
    layout=st.sampled_from(["sharded", "flat", "no label", "list"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_parallel_train_step(
    backend, steps_per_call, nan_policy, n, features, dtype, layout, seed
):
    step = train_step(
        backend=backend, steps_per_call=steps_per_call, nan_policy=nan_policy
    )
    if step is None:
        return
    rng = np.random.default_rng(seed)
    batch = {
        "image": rng.standard_normal((n, 4)).astype(dtype),
        "label": rng.standard_normal((n, 2)).astype(np.float32),
    }
    if features != 4:
        batch["image"] = batch["image"][:, :features]
    if layout == "no label":
        del batch["label"]
    if layout == "list":
        batch = [batch["image"]]
    elif layout == "sharded" or layout == "no label":
        batch = attempt(lambda: es.shard(batch))
        if batch is None:
            return
        if steps_per_call == 2:
            batch = {k: np.stack([v, v]) for k, v in batch.items()}
    attempt(lambda: step(mlp_state(), batch))


# --- BasicTrainer -------------------------------------------------------------------


def dataset(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    return {"image": x.astype(dtype), "label": np.tanh(x[:, :2]).astype(np.float32)}


@settings(max_examples=8)
@given(
    batch_size=st.sampled_from([8, 6, 0, -4, "8", 8.0]),
    num_epochs=st.sampled_from([1, 0, 1.5, -1]),
    opt_type=st.sampled_from(["ADAM", "SGD", "nope"]),
    n_train=st.sampled_from([16, 4, 0]),
    n_test=st.sampled_from([8, 5, 0]),
    dtype=st.sampled_from(["float32", "uint8", "float16"]),
    extra=st.sampled_from([{}, {"momentum": 0.9}, {"epochs": 3}, {"seed": "s"}]),
)
def test_basic_trainer(batch_size, num_epochs, opt_type, n_train, n_test, dtype, extra):
    config = {
        "batch_size": batch_size,
        "num_epochs": num_epochs,
        "opt_type": opt_type,
        "log": False,
        **extra,
    }
    trainer = attempt(
        lambda: es.BasicTrainer(
            config, mlp(), dataset(n_train, dtype), dataset(n_test, dtype, 1)
        )
    )
    if trainer is not None and trainer.num_steps <= 2:
        attempt(trainer.train)


# --- only_apply ---------------------------------------------------------------------


@settings(max_examples=8)
@given(
    n=st.sampled_from([0, 1, 5, 8]),
    dtype=st.sampled_from(["float32", "uint8", "float64"]),
    batch_size=st.sampled_from([4, 8, 6, None]),
    checkpointing=st.booleans(),
    images=st.sampled_from(["array", "missing", "scalar"]),
)
def test_only_apply(tmp_path_factory, n, dtype, batch_size, checkpointing, images):
    config = {"batch_size": batch_size, "checkpointing": checkpointing}
    config["workdir"] = str(tmp_path_factory.mktemp("apply"))
    test_ds = {
        "array": {"image": np.ones((n, 4), dtype)},
        "missing": {"x": np.ones((n, 4))},
        "scalar": {"image": np.float32(1)},
    }[images]
    out = attempt(lambda: es.only_apply(config, mlp(), test_ds))
    if out is not None:
        assert out[0].shape == (n, 2)


# --- the command's options ----------------------------------------------------------

TINY = ["--depth", "3", "--filters", "4", "--patch", "16", "--test-size", "8"]


@settings(max_examples=5)
@given(
    epochs=st.sampled_from(["1", "0", "-1", "x", "1.5"]),
    batch_size=st.sampled_from(["8", "6", "0", "y"]),
    train_size=st.sampled_from(["16", "3", "0"]),
    lr=st.sampled_from(["1e-2", "-1", "nan", "lr"]),
    model=st.sampled_from(["dncnn", "unet", "resnet50"]),
)
@pytest.mark.slow
def test_command_options(tmp_path_factory, epochs, batch_size, train_size, lr, model):
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train", *TINY, "--epochs", epochs, "--batch-size", batch_size]
    argv += ["--train-size", train_size, "--lr", lr, "--model", model]
    argv += ["--out", str(out)]
    sink = open(os.devnull, "w")  # noqa: SIM115
    with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink), sink:
        try:
            code = attempt(lambda: cli.main(argv))
        except SystemExit as e:  # a bad option: one line and exit 2
            code = e.code
    assert code in (0, 2, None)


def test_the_check_catches_an_error_from_inside_jax():
    with pytest.raises(AssertionError, match="not by eqx_steps"):
        attempt(lambda: jnp.ones(3) + jnp.ones(4))
    assert attempt(lambda: es.shard({"x": np.ones(6)})) is None  # eqx_steps's own


def test_a_batch_the_model_cannot_take_is_named():
    # Found by the fuzz test: a shape mismatch inside a layer, named at the batch.
    batch = es.shard({"image": np.ones((8, 3), np.float32), "label": np.ones((8, 2))})
    attempt(
        lambda: train_step(backend="pmap", steps_per_call=1, nan_policy="raise")(
            mlp_state(), batch
        )
    )
    step = train_step(backend="pmap", steps_per_call=1, nan_policy="raise")
    with pytest.raises(
        ValueError, match=r"cannot take `batch\['image'\]` of float32\[2, 3\]"
    ):
        step(mlp_state(), batch)

"""Tests of checkpoints (orbax); model export is in test_model_file.py."""

import functools
import gc
import os
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_equal
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eqx_steps import (
    checkpoint_restore,
    checkpoint_save,
    latest_step,
    load_config,
    per_example,
    TrainState,
)


TX = optax.adam(1e-3)  # built once: a new optax object is a new static value


def _materialise(tree, seed):
    """Arrays for the `ShapeDtypeStruct`s of `tree`, made on the host (no compiling)."""
    rng = np.random.default_rng(seed)

    def make(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype))
        return jnp.asarray(np.zeros(x.shape, x.dtype))

    return jax.tree_util.tree_map(make, tree)


@functools.cache  # states are immutable
def make_state(width=4, depth=1, *, seed=0, key=True, bn=True, tx=TX):
    """A `TrainState` of an MLP (+ BatchNorm with its state), built without running
    the many small JAX operations of the layers' initialisers (each compiles)."""

    def build():
        mlp = eqx.nn.MLP(2, 3, width, depth, key=jax.random.key(0))
        if not bn:
            return mlp, None
        norm, model_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, axis_name="batch", mode="batch"
        )
        return (mlp, norm), model_state

    model, model_state = _materialise(eqx.filter_eval_shape(build), seed)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = _materialise(jax.eval_shape(tx.init, params), seed)
    key_data = np.asarray([0, seed], np.uint32)
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        model=model,
        model_state=model_state,
        opt_state=opt_state,
        key=jax.random.wrap_key_data(key_data) if key else None,
        tx=tx,
        forward=per_example,
        trainable=eqx.is_inexact_array,
    )


def perturb(state, step, seed=1):
    """A state at `step` whose every float leaf and key differ from `make_state`'s.

    Built on the host (numpy), so that no JAX operation is compiled per shape.
    """
    rng = np.random.default_rng([seed, step])

    def change(x):
        x = np.asarray(x)
        return jnp.asarray(x + rng.standard_normal(x.shape).astype(x.dtype))

    state = jax.tree_util.tree_map(
        lambda x: change(x) if eqx.is_inexact_array(x) else x, state
    )
    changes = {"step": jnp.asarray(step, jnp.int32)}
    if state.key is not None:
        data = np.asarray([seed, step], np.uint32)
        changes["key"] = jax.random.wrap_key_data(
            data, impl=jax.random.key_impl(state.key)
        )
    return state.replace(**changes)


def on_host(tree):
    """Array leaves as numpy (keys as their data), to compare across shardings."""

    def host(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x) if eqx.is_array(x) else x

    return jax.tree_util.tree_map(host, tree)


def step_dirs(workdir):
    return sorted(int(d) for d in os.listdir(workdir) if d.isdigit())


# ---------------------------------------------------------------------------
# Round trips


@settings(max_examples=4)
@given(
    st.sampled_from([(4, 1), (8, 2)]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**20),
)
def test_round_trip_is_bit_exact(tmp_path_factory, shape, key, bn, step):
    workdir = tmp_path_factory.mktemp("ckpt")
    width, depth = shape
    template = make_state(width, depth, key=key, bn=bn)
    saved = perturb(template, step)
    assert checkpoint_save(saved, {"batch_size": 8}, workdir)
    restored = checkpoint_restore(template, workdir)
    assert tree_equal(restored, saved)
    assert restored.step.dtype == jnp.int32 and int(restored.step) == step
    if key:
        assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(restored.key) == jax.random.key_impl(saved.key)


def test_round_trip_of_a_created_state(tmp_path):
    # Built the ordinary way: key(0), BatchNorm state, adam state.
    linear = eqx.nn.Linear(3, 3, key=jax.random.key(1))
    norm, model_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, axis_name="batch", mode="batch"
    )
    template = TrainState.create(
        (linear, norm), TX, model_state=model_state, key=jax.random.key(0)
    )
    saved = perturb(template, 12)
    checkpoint_save(saved, {}, tmp_path)
    assert tree_equal(checkpoint_restore(template, tmp_path), saved)


def test_restore_keeps_the_templates_sharding(tmp_path):
    saved = perturb(make_state(), 7)
    checkpoint_save(saved, None, tmp_path)
    mesh = Mesh(np.asarray(jax.devices()), ("device",))
    replicated = NamedSharding(mesh, P())
    arrays, static = eqx.partition(make_state(), eqx.is_array)
    template = eqx.combine(jax.device_put(arrays, replicated), static)
    restored = checkpoint_restore(template, tmp_path)
    assert tree_equal(restored, saved)
    for x in jax.tree_util.tree_leaves(eqx.filter(restored, eqx.is_array)):
        assert x.sharding == replicated
    # A replicated state (as the parallel steps return it) saves as one copy and
    # restores onto a single device.
    checkpoint_save(restored.replace(step=restored.step + 1), None, tmp_path)
    again = checkpoint_restore(make_state(), tmp_path)
    assert tree_equal(on_host(again), on_host(restored.replace(step=restored.step + 1)))
    assert again.model[0].layers[0].weight.sharding == make_state().step.sharding


def test_other_key_impl_is_kept(tmp_path):
    template = make_state().replace(key=jax.random.key(0, impl="rbg"))
    saved = template.replace(
        step=jnp.asarray(3, jnp.int32), key=jax.random.key(5, impl="rbg")
    )
    checkpoint_save(saved, None, tmp_path)
    restored = checkpoint_restore(template, tmp_path)
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(saved.key)
    assert tree_equal(restored, saved)


def test_max_to_keep_keeps_the_last_three(tmp_path):
    template = make_state()
    for step in [1, 2, 5, 9, 10]:
        checkpoint_save(perturb(template, step, seed=step), {}, tmp_path)
    assert step_dirs(tmp_path) == [5, 9, 10]
    assert latest_step(tmp_path) == 10
    assert tree_equal(checkpoint_restore(template, tmp_path), perturb(template, 10, 10))
    checkpoint_save(perturb(template, 11), {}, tmp_path, max_to_keep=1)
    assert step_dirs(tmp_path) == [11]


def test_same_step_is_skipped_an_earlier_one_refused(tmp_path):
    template = make_state()
    assert checkpoint_save(perturb(template, 4), {}, tmp_path)
    assert not checkpoint_save(perturb(template, 4, seed=9), {}, tmp_path)
    assert tree_equal(checkpoint_restore(template, tmp_path), perturb(template, 4))
    with pytest.raises(ValueError, match="step 4, later than this state's step 2"):
        checkpoint_save(perturb(template, 2), {}, tmp_path)


def test_config_is_stored_in_the_checkpoint_without_what_json_cannot_hold(tmp_path):
    config = {
        "batch_size": 16,
        "opt_type": "ADAM",
        "lr": 1e-3,
        "np_int": np.int64(3),
        "np_float": np.float32(0.5),
        "scalar_array": jnp.asarray(2.0),
        "shape": (64, 64, 1),
        "post_lst": [print],
        "criterion": print,
        "tx": TX,
        "array": np.zeros(3),
        "nested": {"a": None, "b": [1, "x"], "fn": len},
    }
    checkpoint_save(make_state(), config, tmp_path)
    written = load_config(tmp_path)
    assert written == {
        "batch_size": 16,
        "opt_type": "ADAM",
        "lr": 1e-3,
        "np_int": 3,
        "np_float": 0.5,
        "scalar_array": 2.0,
        "shape": [64, 64, 1],
        "nested": {"a": None, "b": [1, "x"]},
    }
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # The checkpoint writes nothing but its step directories.
    assert os.listdir(tmp_path) == ["0"]


def test_each_step_keeps_its_own_config(tmp_path):
    template = make_state()
    checkpoint_save(perturb(template, 1), {"lr": 0.1}, tmp_path)
    checkpoint_save(perturb(template, 2), {"lr": 0.2, "extra": "x"}, tmp_path)
    assert load_config(tmp_path) == {"lr": 0.2, "extra": "x"}
    assert load_config(tmp_path, step=1) == {"lr": 0.1}
    with pytest.raises(FileNotFoundError, match="no step 7"):
        load_config(tmp_path, step=7)


def test_config_from_a_dataclass(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Config:
        batch_size: int = 8
        fn: object = print

    checkpoint_save(make_state(), Config(), tmp_path)
    assert load_config(tmp_path) == {"batch_size": 8}
    with pytest.raises(TypeError, match="`config`"):
        checkpoint_save(make_state().replace(step=jnp.asarray(1)), "cfg", tmp_path)


# ---------------------------------------------------------------------------
# Missing, mismatching and corrupt checkpoints


def test_no_checkpoint(tmp_path):
    state = make_state()
    missing = tmp_path / "nowhere"
    assert checkpoint_restore(state, missing, ok_no_ckpt=True) is state
    assert not missing.exists()  # restoring never creates the directory
    with pytest.raises(FileNotFoundError) as info:
        checkpoint_restore(state, missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert "checkpointing=True" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint_restore(state, empty, ok_no_ckpt=True) is state
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        checkpoint_restore(state, empty)
    assert latest_step(missing) is None and latest_step(empty) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_config(empty)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_config(missing)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="`state`"):
        checkpoint_save({"step": 0}, {}, tmp_path)
    with pytest.raises(TypeError, match="`state`"):
        checkpoint_restore(make_state().model, tmp_path)
    with pytest.raises(TypeError, match="`workdir`"):
        checkpoint_save(make_state(), {}, 3)
    with pytest.raises(ValueError, match="`max_to_keep`"):
        checkpoint_save(make_state(), {}, tmp_path, max_to_keep=0)


@pytest.mark.parametrize(
    "other, words",
    [
        (
            lambda: make_state(width=5),
            ["`.model[0].layers[0].weight`", "(5, 2)", "(4, 2)"],
        ),
        (lambda: make_state(depth=2), ["`.model[0].layers[1].weight`", "(4, 4)"]),
        (lambda: make_state(bn=False), ["`.model.layers[0].weight`", "is not in"]),
        (lambda: make_state(key=False), ["`key`", "lacks"]),
        (lambda: make_state(tx=optax.sgd(0.1)), ["opt_state", "lacks"]),
        (
            lambda: jax.tree_util.tree_map(
                lambda x: x.astype(jnp.float16) if eqx.is_inexact_array(x) else x,
                make_state(),
            ),
            ["dtype float16", "dtype float32"],
        ),
    ],
)
def test_other_structure_is_named(tmp_path, other, words):
    checkpoint_save(perturb(make_state(), 3), {}, tmp_path)
    with pytest.raises(ValueError) as info:
        checkpoint_restore(other(), tmp_path)
    message = str(info.value)
    assert "checkpoint step 3" in message and str(tmp_path) in message
    assert "restore into a state built like the saved one" in message
    for word in words:
        assert word in message


def _data_files(step_dir):
    # The array chunks: under `d/` in the item directory and its per-process part.
    return [
        os.path.join(root, f)
        for root, _, fs in os.walk(step_dir)
        for f in fs
        if os.path.basename(root) == "d"
    ]


# On truncated data, orbax's failed read leaves tensorstore callbacks that hit its
# closed event loop ("RuntimeError: Event loop is closed", reported through
# sys.unraisablehook); that noise is orbax's, after our clear ValueError.
_ORBAX_NOISE = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param("truncate_data", marks=_ORBAX_NOISE),
        "delete_metadata",
        "delete_item",
    ],
)
def test_corrupt_latest_step_is_named(tmp_path, damage):
    template = make_state(width=32)
    checkpoint_save(perturb(template, 1), {}, tmp_path)
    checkpoint_save(perturb(template, 2), {}, tmp_path)
    step_dir = tmp_path / "2"
    if damage == "truncate_data":
        files = _data_files(step_dir)
        assert files
        for file in files:
            with open(file, "r+b") as f:
                f.truncate(os.path.getsize(file) // 2)
    elif damage == "delete_metadata":
        os.remove(step_dir / "state" / "_METADATA")
    else:
        import shutil

        shutil.rmtree(step_dir / "state")
    with pytest.raises(ValueError) as info:
        checkpoint_restore(template, tmp_path)
    message = str(info.value)
    assert "checkpoint step 2" in message and "corrupt" in message
    assert str(step_dir) in message and "resume from step 1" in message
    # Let orbax's leftover reads finish within this test.
    gc.collect()
    time.sleep(0.2)
    gc.collect()
    # Deleting the bad step resumes from the previous one, as the message says.
    import shutil

    shutil.rmtree(step_dir)
    assert tree_equal(checkpoint_restore(template, tmp_path), perturb(template, 1))


_SAVER = """
import sys
import equinox as eqx, jax, jax.numpy as jnp, optax
from eqx_steps import checkpoint_save, TrainState

model = eqx.nn.Linear(1024, 2048, key=jax.random.key(0))
state = TrainState.create(model, optax.adam(1e-3), key=jax.random.key(1))
for step in range(1, 10_000):
    filled = jax.tree_util.tree_map(
        lambda x: jnp.full_like(x, step) if eqx.is_inexact_array(x) else x, state
    )
    checkpoint_save(filled.replace(step=jnp.asarray(step, jnp.int32)), {}, sys.argv[1])
    print(step, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_last_complete_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(workdir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        # Wait for a complete step (a step directory appears by rename, complete),
        # then for the next save to be under way, then kill the saver.
        while not (workdir.is_dir() and step_dirs(workdir)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        while not any("orbax-checkpoint-tmp" in d for d in os.listdir(workdir)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    model = eqx.nn.Linear(1024, 2048, key=jax.random.key(0))
    template = TrainState.create(model, optax.adam(1e-3), key=jax.random.key(1))
    last = latest_step(workdir)
    assert last is not None and last == max(step_dirs(workdir))
    restored = checkpoint_restore(template, workdir)
    assert int(restored.step) == last
    for x in jax.tree_util.tree_leaves(eqx.filter(restored, eqx.is_inexact_array)):
        assert np.all(np.asarray(x) == last)
    assert tree_equal(restored.key, template.key)
    # Training resumes and saves the step whose save was interrupted, over orbax's
    # leftover temporary directory.
    resumed = restored.replace(step=restored.step + 1)
    assert checkpoint_save(resumed, {}, workdir)
    assert latest_step(workdir) == last + 1
    assert tree_equal(checkpoint_restore(template, workdir), resumed)

"""Tests of model export: `save_model`/`load_model`, with the file's checksum."""

import functools
import os

import equinox as eqx
import jax
import numpy as np
import pytest
from helpers import tree_equal
from hypothesis import given, strategies as st

from eqx_steps import load_model, save_model


@functools.cache
def make(width=4, depth=1, seed=0, bn=True):
    """An MLP (+ a BatchNorm and its state) with float leaves drawn from `seed`."""

    def build():
        mlp = eqx.nn.MLP(2, 3, width, depth, key=jax.random.key(0))
        if not bn:
            return mlp, None
        norm, model_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
            3, "batch", mode="batch"
        )
        return (mlp, norm), model_state

    rng = np.random.default_rng(seed)

    def fill(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return np.asarray(rng.standard_normal(x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map(fill, eqx.filter_eval_shape(build))


def test_round_trip(tmp_path):
    model, model_state = make(seed=1)
    path = tmp_path / "export" / "model.eqx"
    save_model(path, model, model_state)
    assert os.listdir(path.parent) == ["model.eqx"]  # no temporary file left
    assert path.read_bytes().startswith(b"EQXSTEPS-MODEL\n")
    out = load_model(path, *make(seed=3))
    assert tree_equal(out, (model, model_state))
    # No suffix is added to a path without one; keys round-trip as keys.
    bare = tmp_path / "bare"
    save_model(bare, (model, jax.random.key(7)))
    assert bare.is_file()
    (loaded, key), none = load_model(bare, (make(seed=3)[0], jax.random.key(0)))
    assert none is None and tree_equal(key, jax.random.key(7))
    # A template made without allocating arrays works too.
    mlp, _ = make(bn=False)
    save_model(bare, mlp)
    shapes = eqx.filter_eval_shape(lambda: make(seed=4, bn=False)[0])
    loaded, _ = load_model(bare, shapes)
    assert tree_equal(loaded, mlp)


def test_save_replaces_atomically(tmp_path):
    path = tmp_path / "model.eqx"
    save_model(path, make(seed=1)[0])
    save_model(path, make(seed=2)[0])
    model, _ = load_model(path, make()[0])
    assert tree_equal(model, make(seed=2)[0])
    assert os.listdir(tmp_path) == ["model.eqx"]


def test_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.eqx"):
        load_model(tmp_path / "nothing.eqx", make()[0])
    with pytest.raises(ValueError, match="is a folder, not a model file"):
        load_model(tmp_path, make()[0])
    with pytest.raises(ValueError, match="is a folder; save_model writes one file"):
        save_model(tmp_path, make()[0])
    with pytest.raises(TypeError, match="`path` must be a file path"):
        load_model(3, make()[0])
    path = tmp_path / "model.eqx"
    model, model_state = make()
    save_model(path, model, model_state)
    with pytest.raises(ValueError, match="does not match") as info:
        load_model(path, make(width=5)[0], model_state)
    assert str(path) in str(info.value) and "(5, 2)" in str(info.value)
    with pytest.raises(ValueError, match="more leaves"):
        load_model(path, model)  # the model_state was saved too
    with pytest.raises(ValueError, match="does not match"):
        load_model(path, make(depth=3)[0], model_state)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(ValueError, match="corrupt: checksum mismatch"):
        load_model(path, model, model_state)
    path.write_bytes(b"EQXSTEPS-MODEL\n\x01abc")
    with pytest.raises(ValueError, match="corrupt: truncated inside its header"):
        load_model(path, model, model_state)
    path.write_bytes(b"EQXSTEPS-MODEL\n\x07" + bytes(40))
    with pytest.raises(ValueError, match="format version 7"):
        load_model(path, model, model_state)


HEADER = len(b"EQXSTEPS-MODEL\n") + 1 + 32


@given(offset=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(tmp_path_factory, offset, bit):
    # The case: a few data bytes flipped used to load into wrong weights.
    path = tmp_path_factory.mktemp("flip") / "model.eqx"
    model, model_state = make(seed=5)
    save_model(path, model, model_state)
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt|format version|no eqx_steps header"):
        load_model(path, model, model_state)


def test_file_without_header_is_refused_unless_allowed(tmp_path):
    # The first format: the bare payload of eqx.tree_serialise_leaves.
    path = tmp_path / "old.eqx"
    model, model_state = make(seed=6)
    eqx.tree_serialise_leaves(path, (model, model_state))
    with pytest.raises(ValueError, match="allow_unverified=True"):
        load_model(path, *make())
    out = load_model(path, *make(), allow_unverified=True)
    assert tree_equal(out, (model, model_state))
    with pytest.raises(TypeError, match="allow_unverified"):
        load_model(path, *make(), allow_unverified=1)
    # Re-saving adds the checksum.
    save_model(path, *out)
    assert tree_equal(load_model(path, *make()), (model, model_state))
    assert path.stat().st_size > HEADER

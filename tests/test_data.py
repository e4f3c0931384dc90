"""Tests of the data iterators: shuffling, resumption, per-process slices, remainder."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from eqx_steps.data import create_input_iter, DeviceIter, IterateData


N_DEVICES = 4


def make_dataset(n, shape=(3,), dtype=np.float64):
    """`idx` tells which example a row came from; image/label are functions of it."""
    idx = np.arange(n)
    image = (idx.reshape(n, *([1] * len(shape))) + np.zeros(shape)).astype(dtype)
    return {"image": image, "label": -idx.astype(np.int32), "idx": idx}


# A dataset size and a valid (global) batch size for it: a multiple of 4 devices.
@st.composite
def sizes(draw, train=True):
    n = draw(st.integers(4 if train else 1, 60))
    max_b = (n // N_DEVICES) * N_DEVICES if train else 64
    b = draw(st.sampled_from(range(N_DEVICES, max(max_b, N_DEVICES) + 1, N_DEVICES)))
    return n, b


seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------
# IterateData: training


@settings(max_examples=25)
@given(sizes(), seeds)
def test_each_epoch_is_a_permutation_without_repeats(nb, seed):
    n, b = nb
    ds = IterateData(make_dataset(n), b, key=jax.random.key(seed))
    assert ds.steps_per_epoch == ds.num_batches == n // b
    orders = []
    for _ in range(3):
        idx = np.concatenate([next(ds)["idx"] for _ in range(ds.steps_per_epoch)])
        assert idx.shape == (ds.steps_per_epoch * b,)
        assert len(np.unique(idx)) == idx.size
        assert idx.min() >= 0 and idx.max() < n
        orders.append(idx)
    if n >= 8:  # three epochs in the same order would be a reshuffling bug
        assert not (
            np.array_equal(orders[0], orders[1]) and np.array_equal(*orders[1:])
        )


@settings(max_examples=25)
@given(sizes(), seeds, st.integers(0, 3), st.data())
def test_started_at_any_step_continues_the_same_order(nb, seed, epoch, data):
    n, b = nb
    dataset = make_dataset(n)
    ref = IterateData(dataset, b, key=jax.random.key(seed))
    j = data.draw(st.integers(0, ref.steps_per_epoch - 1))
    start = epoch * ref.steps_per_epoch + j
    expected = [
        ref.batch(s)["idx"] for s in range(start, start + 2 * ref.steps_per_epoch)
    ]
    resumed = IterateData(dataset, b, key=jax.random.key(seed), start_step=start)
    got = [next(resumed)["idx"] for _ in range(2 * ref.steps_per_epoch)]
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    # ... and equals the uninterrupted run up to there.
    fresh = IterateData(dataset, b, key=jax.random.key(seed))
    run = [next(fresh)["idx"] for _ in range(start + 1)]
    np.testing.assert_array_equal(run[start], expected[0])


@settings(max_examples=25)
@given(sizes(), seeds, st.sampled_from([1, 2, 4]), st.booleans())
def test_process_slices_concatenate_to_the_global_batch(nb, seed, procs, train):
    n, b = nb
    if b % procs:
        b *= procs
    if train and n < b:
        n = b
    dataset = make_dataset(n)
    glob = IterateData(dataset, b, train, key=seed)
    parts = [
        IterateData(dataset, b, train, key=seed, process_index=p, process_count=procs)
        for p in range(procs)
    ]
    assert all(part.local_batch_size == b // procs for part in parts)
    for _ in range(min(glob.num_batches * 2, 6) if train else glob.num_batches):
        whole = next(glob)
        pieces = [next(part) for part in parts]
        assert set(whole) == set(pieces[0])
        for name in whole:
            if len(whole[name]) < b:  # the smaller last evaluation batch: whole
                assert all(np.array_equal(p[name], whole[name]) for p in pieces)
                continue
            np.testing.assert_array_equal(
                np.concatenate([piece[name] for piece in pieces]), whole[name]
            )
    if not train:
        for part in parts:
            with pytest.raises(StopIteration):
                next(part)


def test_same_key_same_order_other_key_other_order():
    dataset = make_dataset(64)
    first = lambda key: next(IterateData(dataset, 64, key=key))["idx"]  # noqa: E731
    np.testing.assert_array_equal(first(jax.random.key(3)), first(jax.random.key(3)))
    np.testing.assert_array_equal(first(3), first(jax.random.key(3)))
    np.testing.assert_array_equal(first(None), first(jax.random.key(0)))
    np.testing.assert_array_equal(first(jax.random.PRNGKey(3)), first(3))
    assert not np.array_equal(first(jax.random.key(3)), first(jax.random.key(4)))
    key = jax.random.key(3)
    assert IterateData(dataset, 64, key=key).key is key  # SCICO's attribute


def test_batches_are_host_arrays_with_the_dataset_dtypes():
    dataset = make_dataset(16, dtype=np.float16)
    dataset["image"] = jnp.asarray(dataset["image"])  # JAX input is accepted too
    batch = next(IterateData(dataset, 8))
    assert all(isinstance(x, np.ndarray) for x in batch.values())
    assert batch["image"].dtype == np.float16 and batch["label"].dtype == np.int32
    assert set(batch) == {"image", "label", "idx"}
    np.testing.assert_array_equal(batch["label"], -batch["idx"])


# ---------------------------------------------------------------------------
# IterateData: evaluation


@settings(max_examples=25)
@given(sizes(train=False), st.sampled_from([1, 2, 4]))
def test_eval_yields_each_example_once_in_order(nb, procs):
    n, b = nb
    b = b * procs if b % procs else b
    parts = [
        IterateData(
            make_dataset(n), b, train=False, process_index=p, process_count=procs
        )
        for p in range(procs)
    ]
    full, rest = n // b, n % b
    assert parts[0].num_batches == -(-n // b)
    assert parts[0].steps_per_epoch == full and parts[0].remainder == rest
    batches = [list(part) for part in parts]
    assert all(len(bs) == parts[0].num_batches for bs in batches)
    seen = []
    for step in zip(*batches):
        if len(seen) < full:  # a full batch: each process yields its slice
            idx = np.concatenate([piece["idx"] for piece in step])
            assert idx.shape == (b,)
        else:  # the smaller last batch: every process yields all of it
            idx = step[0]["idx"]
            assert idx.shape == (rest,)
            assert all(np.array_equal(piece["idx"], idx) for piece in step)
        assert set(step[0]) == {"image", "label", "idx"}  # no padding, no mask
        seen.append(idx)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(n))


@settings(max_examples=10)
@given(sizes(train=False), st.booleans(), st.integers(0, 2), seeds)
def test_indices_are_the_rows_of_each_batch(nb, train, process, seed):
    n, b = nb
    if train:  # at least one full batch
        n, b = max(n, N_DEVICES), min(b, max(n, N_DEVICES) // N_DEVICES * N_DEVICES)
    ds = IterateData(
        make_dataset(n), b, train, seed, process_index=process, process_count=4
    )
    last = ds.num_batches + (3 * ds.steps_per_epoch if train else 0)
    for step in range(last):
        np.testing.assert_array_equal(ds.indices(step), ds.batch(step)["idx"])


def test_eval_start_step_and_reset():
    ds = IterateData(make_dataset(20), 8, train=False, start_step=1)
    assert [b["idx"][0] for b in ds] == [8, 16]
    ds.reset()
    assert len(list(ds)) == 3
    assert list(ds) == []


# ---------------------------------------------------------------------------
# create_input_iter


def _values(batch):
    return {name: np.asarray(x) for name, x in batch.items()}


@pytest.mark.parametrize("k", [1, 3])
def test_input_iter_shapes_shardings_dtypes(k):
    dataset = make_dataset(40, shape=(5, 5, 2))
    it = create_input_iter(jax.random.key(0), dataset, 8, steps_per_call=k)
    assert isinstance(it, DeviceIter)
    assert it.steps_per_epoch == it.num_batches == 5
    batch = next(it)
    lead = (N_DEVICES, 2) if k == 1 else (k, N_DEVICES, 2)
    spec = P("device") if k == 1 else P(None, "device")
    assert batch["image"].shape == (*lead, 5, 5, 2)
    assert batch["label"].shape == batch["idx"].shape == lead
    assert batch["image"].dtype == jnp.float32
    assert jnp.issubdtype(batch["label"].dtype, jnp.integer)
    assert jnp.issubdtype(batch["idx"].dtype, jnp.integer)
    for x in batch.values():
        assert isinstance(x.sharding, NamedSharding)
        assert x.sharding.spec == spec
        assert x.sharding.mesh.devices.tolist() == jax.local_devices()
        # Each device holds its own per-device slice.
        shard_shapes = {s.data.shape for s in x.addressable_shards}
        assert shard_shapes == {(*lead[:-2], 1, 2, *x.shape[len(lead) :])}


@settings(max_examples=8)
@given(
    st.sampled_from([1, 2, 3]),
    st.sampled_from([0, 1, 2, 5]),
    st.integers(0, 12),
    seeds,
)
def test_input_iter_values_are_the_host_batches(k, prefetch, start, seed):
    dataset = make_dataset(36)
    host = IterateData(dataset, 8, key=seed)
    it = create_input_iter(
        seed, dataset, 8, prefetch, steps_per_call=k, start_step=start
    )
    for call in range(4):
        got = _values(next(it))
        for i in range(k):
            want = host.batch(start + call * k + i)
            for name in want:
                x = got[name] if k == 1 else got[name][i]
                np.testing.assert_array_equal(x.reshape(want[name].shape), want[name])


def test_input_iter_prefetches_ahead():
    it = create_input_iter(0, make_dataset(64), 8, size_device_prefetch=3)
    next(it)
    assert len(it._queue) == 3 and it.data.step == 4 and it.step == 1
    it0 = create_input_iter(0, make_dataset(64), 8, size_device_prefetch=0)
    next(it0)
    assert len(it0._queue) == 0 and it0.data.step == 1 and it0.step == 1
    it2 = create_input_iter(0, make_dataset(64), 8, 2, steps_per_call=3, start_step=5)
    assert it2.step == 5
    next(it2)
    assert it2.data.step == 5 + 9 and it2.step == 8


def test_input_iter_eval_dtype_and_remainder():
    dataset = make_dataset(10, dtype=np.float64)
    it = create_input_iter(None, dataset, 8, dtype=jnp.bfloat16, train=False)
    batches = list(it)
    assert len(batches) == it.num_batches == 1 and it.remainder == 2
    assert batches[0]["image"].dtype == jnp.bfloat16
    assert batches[0]["idx"].shape == (N_DEVICES, 2)
    rest = it.remainder_batch()
    assert rest is not None and all(isinstance(x, np.ndarray) for x in rest.values())
    assert rest["image"].dtype == jnp.bfloat16 and rest["image"].shape == (2, 3)
    idx = np.concatenate([np.asarray(batches[0]["idx"]).ravel(), rest["idx"]])
    np.testing.assert_array_equal(idx, np.arange(10))
    kept = next(create_input_iter(None, dataset, 8, dtype=None))
    assert kept["image"].dtype == jnp.float32  # float64 -> float32 by JAX itself


@pytest.mark.parametrize("n, full", [(24, 3), (26, 3), (5, 0)])
def test_input_iter_eval_stops_after_one_pass(n, full):
    it = create_input_iter(
        None, make_dataset(n), 8, size_device_prefetch=5, train=False
    )
    assert it.num_batches == full
    assert sum(1 for _ in it) == full
    with pytest.raises(StopIteration):
        next(it)
    rest = it.remainder_batch()
    assert (rest is None) == (n % 8 == 0)
    if rest is not None:
        np.testing.assert_array_equal(rest["idx"], np.arange(full * 8, n))
    assert create_input_iter(None, make_dataset(26), 8).remainder_batch() is None


def test_input_iter_train_is_infinite():
    it = create_input_iter(1, make_dataset(16), 8)
    assert len(list(itertools.islice(it, 7))) == 7


# ---------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "dataset, batch_size, kwargs, error, words",
    [
        ([1, 2, 3], 4, {}, TypeError, ["`dataset`", "list", "'image'"]),
        ({}, 4, {}, ValueError, ["`dataset`", "empty"]),
        (
            {"image": np.zeros((8, 2)), "label": np.zeros(7)},
            4,
            {},
            ValueError,
            ["'image': 8", "'label': 7", "lengths"],
        ),
        ({"image": np.float32(1.0)}, 4, {}, ValueError, ["scalar", "'image'"]),
        ({"image": np.zeros(8)}, 0, {}, ValueError, ["`batch_size`", "0"]),
        ({"image": np.zeros(8)}, -4, {}, ValueError, ["`batch_size`", "-4"]),
        ({"image": np.zeros(8)}, 4.0, {}, TypeError, ["`batch_size`", "4.0"]),
        ({"image": np.zeros(8)}, True, {}, TypeError, ["`batch_size`", "True"]),
        ({"image": np.zeros(16)}, 6, {}, ValueError, ["`batch_size` = 6", "4", "8"]),
        ({"image": np.zeros(16)}, 10, {}, ValueError, ["8 or 12"]),
        ({"image": np.zeros(6)}, 8, {}, ValueError, ["6 examples", "`batch_size` = 8"]),
        (
            {"image": np.zeros(8)},
            8,
            {"process_count": 3},
            ValueError,
            ["`batch_size` = 8", "3 processes"],
        ),
        (
            {"image": np.zeros(8)},
            8,
            {"process_index": 2, "process_count": 2},
            ValueError,
            ["`process_index` = 2"],
        ),
        ({"image": np.zeros(8)}, 8, {"key": "seed"}, TypeError, ["`key`", "'seed'"]),
        ({"image": np.zeros(0)}, 4, {"train": False}, ValueError, ["no examples"]),
        (
            {"image": np.zeros(8)},
            4,
            {"train": False, "start_step": 3},
            ValueError,
            ["`start_step` = 3"],
        ),
    ],
)
def test_bad_inputs_are_named(dataset, batch_size, kwargs, error, words):
    with pytest.raises(error) as info:
        IterateData(dataset, batch_size, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_input_iter_arguments_are_named():
    dataset = make_dataset(32)
    with pytest.raises(ValueError, match="steps_per_call"):
        create_input_iter(0, dataset, 8, train=False, steps_per_call=2)
    with pytest.raises(ValueError, match="size_device_prefetch"):
        create_input_iter(0, dataset, 8, size_device_prefetch=-1)
    with pytest.raises(ValueError, match="`dtype` = int32"):
        create_input_iter(0, dataset, 8, dtype=jnp.int32)
    # 8 rows over 2 processes leaves 4 per process: fine for 4 local devices ...
    create_input_iter(0, dataset, 8, process_index=0, process_count=2)
    # ... but 2 per process is not.
    with pytest.raises(ValueError, match="2 rows per process"):
        create_input_iter(0, dataset, 8, process_index=0, process_count=4)

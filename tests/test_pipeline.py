"""Grain inputs (issue 22): `BasicTrainer`, `create_input_iter` and
`evaluate_dataset` read Grain datasets and loaders; the input's state rides in
each checkpoint, so a resumed run sees the batches of the uninterrupted one; bad
input fails clearly. Through the public API, on 1 process x 4 CPU devices (the
multi-process runs are in tests/test_pipeline_distributed.py)."""

import json
import os
import signal

import grain
import hypothesis.strategies as st
import jax
import numpy as np
import optax
import pytest
from helpers import mlp
from hypothesis import given, settings
from mp_transforms import FailOn

import eqx_steps as es
from eqx_steps.pipeline import GrainStream, PipelineError


_RNG = np.random.default_rng(7)
_X = _RNG.normal(size=(32, 4)).astype(np.float32)
_Y = np.stack([np.sin(_X[:, 0]), _X[:, 1] * _X[:, 2]], -1).astype(np.float32)
_DS = {"image": _X, "label": _Y}
_EXAMPLES = [{"image": _X[i], "label": _Y[i]} for i in range(len(_X))]
_BASE = {"batch_size": 8, "opt_type": "SGD", "base_learning_rate": 0.05}


def _map_ds(shuffle=True):
    """Global batches of 8, a fresh order every epoch (an endless MapDataset)."""
    ds = grain.MapDataset.source(_EXAMPLES)
    if shuffle:
        ds = ds.shuffle(seed=3)
    return ds.repeat().batch(8, drop_remainder=True)


def _iter_ds():
    """One epoch of shuffled global batches (an IterDataset, read again per pass)."""
    return (
        grain.MapDataset.source(_EXAMPLES)
        .shuffle(seed=4)
        .to_iter_dataset()
        .batch(8, drop_remainder=True)
    )


def _prefetched():
    """Endless batches read by a Grain worker process (`mp_prefetch`)."""
    ds = grain.MapDataset.source(_EXAMPLES).shuffle(seed=6).repeat().to_iter_dataset()
    options = grain.MultiprocessingOptions(num_workers=1)
    return ds.batch(8, drop_remainder=True).mp_prefetch(options)


def _loader(workers=0, flag="/nonexistent"):
    sampler = grain.samplers.IndexSampler(
        len(_EXAMPLES),
        shard_options=grain.sharding.NoSharding(),
        shuffle=True,
        num_epochs=None,
        seed=5,
    )
    return grain.DataLoader(
        data_source=_EXAMPLES,
        sampler=sampler,
        operations=[
            FailOn(_X[13, 0], flag),
            grain.transforms.Batch(8, drop_remainder=True),
        ],
        worker_count=workers,
    )


def _train(ds, workdir=None, num_steps=10, **config):
    cfg = {**_BASE, "num_steps": num_steps, "log_every_steps": 2, **config}
    if workdir is not None:
        cfg.update(checkpointing=True, workdir=str(workdir), steps_per_checkpoint=2)
    trainer = es.BasicTrainer(cfg, mlp(), ds)
    state, _ = trainer.train()
    return state


def _same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- Grain inputs read as dicts of arrays are ----------------------------------------


@pytest.mark.slow
def test_grain_batches_train_as_the_same_batches_from_a_dict():
    """In order, the batches of a MapDataset are the dict's with shuffle off:
    the same final state, bit for bit; an IterDataset of them too."""
    from_dict = _train(_DS, shuffle=False)
    from_map = _train(_map_ds(shuffle=False))
    _same(from_dict.model, from_map.model)
    one_pass = grain.MapDataset.source(_EXAMPLES).to_iter_dataset().batch(8)
    _same(from_dict.model, _train(one_pass).model)  # read again at each pass
    # 3 steps per call, single steps up to each log point (every 2): one stream.
    stacked = _train(_DS, shuffle=False, steps_per_call=3)
    _same(stacked.model, _train(_map_ds(shuffle=False), steps_per_call=3).model)


def test_create_input_iter_places_grain_batches_like_a_dict():
    it = es.create_input_iter(None, _map_ds(shuffle=False), 8, steps_per_call=2)
    ref = es.create_input_iter(None, _DS, 8, shuffle=False, steps_per_call=2)
    for _ in range(3):
        a, b = next(it), next(ref)
        assert a["image"].shape == (2, 4, 2, 4)  # (steps, devices, per device, ...)
        assert a["image"].sharding == b["image"].sharding
        _same(a, b)
    assert it.step == 6


def test_evaluate_dataset_on_grain_equals_the_dict():
    """A last smaller batch (drop_remainder=False) counts as the dict's remainder."""
    state = es.TrainState.create(mlp(), optax.sgd(0.1))
    fn = es.parallel_eval_step(es.mse_loss, es.compute_metrics)
    ds = {k: v[:28] for k, v in _DS.items()}
    kw = {"criterion": es.mse_loss, "metrics_fn": es.compute_metrics}
    ref = es.evaluate_dataset(fn, state, ds, 8, **kw)
    source = grain.MapDataset.source(_EXAMPLES[:28]).batch(8)
    got = es.evaluate_dataset(fn, state, source, 8, **kw)
    assert got == pytest.approx(ref, rel=1e-6)
    some = es.evaluate_dataset(fn, state, source, 8, max_batches=2, **kw)
    assert some == pytest.approx(
        es.evaluate_dataset(fn, state, ds, 8, max_batches=2, **kw), rel=1e-6
    )


def test_a_grain_test_set_and_other_key_names():
    config = {**_BASE, "num_steps": 4, "log_every_steps": 4, "input_key": "x",
              "target_key": "y"}  # fmt: skip
    rows = [{"x": e["image"], "y": e["label"]} for e in _EXAMPLES]
    train = grain.MapDataset.source(rows).repeat().batch(8, drop_remainder=True)
    test = grain.MapDataset.source(rows[:20]).batch(8)
    trainer = es.BasicTrainer(config, mlp(), train, test)
    _, history = trainer.train()
    dict_test = {"x": _X[:20], "y": _Y[:20]}
    ref = es.BasicTrainer(config, mlp(), {"x": _X, "y": _Y}, dict_test)
    assert history.records[-1]["eval_loss"] == pytest.approx(
        ref.evaluate(trainer.state)["loss"], rel=1e-6
    )


# --- the input's state in each checkpoint: exact resume ------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "map",
        pytest.param("iter", marks=pytest.mark.slow),
        pytest.param("loader", marks=pytest.mark.slow),
        pytest.param("mp_prefetch", marks=pytest.mark.slow),
    ],
)
def test_resume_sees_the_batches_of_the_uninterrupted_run(kind, tmp_path):
    make = {"map": _map_ds, "iter": _iter_ds, "loader": _loader}.get(kind, _prefetched)
    whole = _train(make(), num_steps=10, steps_per_call=2)
    # Interrupted at step 6 (mid-epoch for the 4-batch epochs), resumed to 10.
    _train(make(), tmp_path, num_steps=6, steps_per_call=2)
    state = es.load_data_state(tmp_path)
    assert state is not None and state["step"] == 6 and state["rows"] == "global"
    resumed = _train(make(), tmp_path, num_steps=10, steps_per_call=2)
    assert int(resumed.step) == 10
    _same(whole.model, resumed.model)


@pytest.mark.slow
def test_a_stop_signal_saves_the_input_state_and_resume_is_exact(tmp_path):
    """SIGTERM at step 5 (between checkpoints): the stop's checkpoint holds the
    input's state of step 5, and the resumed run ends as the uninterrupted one."""
    whole = _train(_iter_ds(), num_steps=10)
    config = {**_BASE, "num_steps": 10, "log_every_steps": 10, "checkpointing": True,
              "workdir": str(tmp_path), "steps_per_checkpoint": 100}  # fmt: skip
    trainer = es.BasicTrainer(config, mlp(), _iter_ds())
    trainer.add_hook(
        lambda info: os.kill(os.getpid(), signal.SIGTERM) if info.step == 5 else None
    )
    with pytest.raises(es.TrainingInterrupted):
        trainer.train()
    saved = es.load_data_state(tmp_path)
    assert es.latest_step(tmp_path) == 5 and saved is not None and saved["step"] == 5
    resumed, _ = es.BasicTrainer(config, mlp(), _iter_ds()).train()
    _same(whole.model, resumed.model)


@settings(max_examples=6)
@given(stop=st.integers(0, 11), kind=st.sampled_from(["map", "iter", "loader"]))
def test_a_restored_stream_reads_on_as_the_uninterrupted_one(stop, kind):
    """Round trip through the JSON state at any step, across passes (epochs of 4
    batches): the same batches from there on."""
    make = {"map": _map_ds, "iter": _iter_ds, "loader": _loader}[kind]
    ref = GrainStream(make(), 8, train=True)
    expected = [ref.batch(s)["image"] for s in range(stop, stop + 6)]
    first = GrainStream(make(), 8, train=True)
    for s in range(stop):
        first.batch(s)
    saved = json.loads(json.dumps(first.checkpoint_state(stop)))
    resumed = GrainStream(make(), 8, train=True)
    resumed.restore(stop, saved)
    for s, want in zip(range(stop, stop + 6), expected):
        np.testing.assert_array_equal(resumed.batch(s)["image"], want)


def test_the_input_state_is_json(tmp_path):
    state = es.TrainState.create(mlp(), optax.sgd(0.1))
    with pytest.raises(TypeError, match="`data_state` must be a JSON object"):
        es.checkpoint_save(state, {}, tmp_path, data_state={"a": np.zeros(2)})
    es.checkpoint_save(state, {}, tmp_path, data_state={"a": [1, {"b": None}]})
    assert es.load_data_state(tmp_path, step=0) == {"a": [1, {"b": None}]}


def test_without_a_stored_input_state_a_checkpoint_still_restores(tmp_path):
    _train(_DS, tmp_path, num_steps=4)  # a dict run stores no input state
    assert es.load_data_state(tmp_path) is None
    with pytest.warns(UserWarning, match="no input-pipeline state"):
        trainer = es.BasicTrainer(
            {**_BASE, "num_steps": 6, "checkpointing": True, "workdir": str(tmp_path)},
            mlp(),
            _map_ds(),
        )
    assert int(trainer.state.step) == 4


def test_a_changed_pipeline_is_refused_on_resume(tmp_path):
    _train(_map_ds(), tmp_path, num_steps=2)
    config = {**_BASE, "num_steps": 4, "checkpointing": True, "workdir": str(tmp_path)}
    with pytest.raises(ValueError, match="Grain MapDataset, but `train_ds` is a Iter"):
        es.BasicTrainer(config, mlp(), _iter_ds())
    ds = grain.MapDataset.source(_EXAMPLES).repeat().batch(16, drop_remainder=True)
    with pytest.raises(ValueError, match="global batch size 8.*this run's is 16"):
        es.BasicTrainer(
            {
                **_BASE,
                "batch_size": 16,
                "num_steps": 4,
                "checkpointing": True,
                "workdir": str(tmp_path),
            },  # fmt: skip
            mlp(),
            ds,
        )


# --- bad input --------------------------------------------------------------------


def test_fewer_examples_than_one_global_batch_is_named():
    five = grain.MapDataset.source(_EXAMPLES[:5])
    with pytest.raises(ValueError, match="5 examples, fewer than `batch_size` = 8"):
        es.BasicTrainer({**_BASE, "num_steps": 2}, mlp(), five.batch(8))
    with pytest.raises(ValueError, match="yields no batch.*batch of `batch_size` = 8"):
        es.BasicTrainer(
            {**_BASE, "num_steps": 2}, mlp(), five.batch(8, drop_remainder=True)
        )
    with pytest.raises(ValueError, match="different leading sizes.*must be batched"):
        es.BasicTrainer({**_BASE, "num_steps": 2}, mlp(), five)  # not batched
    one = grain.MapDataset.source([{"image": _X[i], "label": _X[i]} for i in range(9)])
    with pytest.raises(ValueError, match="batch of 4 examples.*must be batched"):
        es.BasicTrainer({**_BASE, "num_steps": 2}, mlp(), one)
    with pytest.raises(ValueError, match="step 3, smaller than the 8"):
        es.BasicTrainer({**_BASE, "num_steps": 8}, mlp(), _iter_ds_of(28)).train()


def _iter_ds_of(n):
    return grain.MapDataset.source(_EXAMPLES[:n]).to_iter_dataset().batch(8)


@pytest.mark.slow
def test_a_dying_worker_stops_the_run_and_resume_works(tmp_path):
    """A DataLoader worker whose transform raises: the run stops with the
    worker's error (not a hang), the last checkpoint is intact, and resuming
    from it gives the uninterrupted run's state."""
    flag = tmp_path / "broken"
    workdir = tmp_path / "run"
    _train(_loader(workers=1, flag=str(flag)), workdir, num_steps=6)
    flag.touch()  # record 13 now fails to decode; it comes in every epoch of 4 steps
    with pytest.raises(PipelineError, match="cannot decode record 13") as info:
        _train(_loader(workers=1, flag=str(flag)), workdir, num_steps=16)
    stopped = es.latest_step(workdir)
    assert stopped is not None and 6 <= stopped < 16
    assert f"the last checkpoint, step {stopped}" in str(info.value)
    assert "is intact" in str(info.value)
    flag.unlink()  # the bad record fixed
    resumed = _train(_loader(workers=1, flag=str(flag)), workdir, num_steps=16)
    whole = _train(_loader(workers=0), num_steps=16)  # the same batches as 1 worker
    _same(whole.model, resumed.model)


# --- the streamed image folder, resumed ---------------------------------------------


@pytest.mark.slow
def test_a_streamed_image_folder_resumes_with_the_same_patches(tmp_path):
    """`image_folder_dataset` through the trainer: stopped at step 4 (mid-epoch)
    and resumed to 8, it ends bit-identical to the uninterrupted run."""
    import equinox as eqx
    from PIL import Image

    from eqx_steps.pipeline import image_folder_dataset

    rng = np.random.default_rng(0)
    for name, shape in (("a", (20, 24)), ("b", (18, 30)), ("c", (26, 17))):
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(
            tmp_path / f"{name}.png"
        )

    def run(workdir, num_steps):
        ds = image_folder_dataset(
            tmp_path, patch_size=8, batch_size=4, patches_per_epoch=24, seed=3,
            augment=True, noise_std=0.1,
        )  # fmt: skip
        model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
            depth=2, channels=1, num_filters=4, key=jax.random.key(0)
        )
        config = {"batch_size": 4, "num_steps": num_steps, "log_every_steps": 4}
        if workdir is not None:
            config.update(checkpointing=True, workdir=str(workdir),
                          steps_per_checkpoint=4)  # fmt: skip
        state, _ = es.BasicTrainer(config, model, ds, model_state=model_state).train()
        return state

    whole = run(None, 8)
    run(tmp_path / "run", 4)
    saved = es.load_data_state(tmp_path / "run")
    assert saved is not None and saved["source"] == "IterDataset"
    resumed = run(tmp_path / "run", 8)
    _same(whole.model, resumed.model)

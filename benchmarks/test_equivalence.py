"""The baselines do the library's math: same metrics and parameters after 3 steps.

Not benchmarks (no `benchmark` fixture): they run with `pytest benchmarks` and
`--benchmark-disable`, and are skipped by `--benchmark-only`.
"""

import jax
import numpy as np
import pytest
import workloads as w

import eqx_steps as es


_BACKENDS = ("pmap", "sharded")


def _run_library(workload, sizes, kind, backend, k, n_calls=3):
    state = w.library_state(workload, sizes)
    step = w.library_step(kind, backend, steps_per_call=k, unroll=2)
    b = w.batch(workload, sizes, steps_per_call=k)
    if kind == "eval":
        return state, step(state, b)
    for _ in range(n_calls):
        state, metrics = step(state, b)
    return state, metrics


def _run_raw(workload, sizes, kind, backend, k, n_calls=3, layout="HWIO"):
    net = w.raw_net(workload, *w.library_model(workload, sizes), layout=layout)
    arrays = w.place_raw_state(w.raw_state(net), backend)
    step = w.raw_step(net, kind, backend, steps_per_call=k, unroll=2)
    b = w.batch(workload, sizes, steps_per_call=k)
    if backend == "jit":
        b = w.single_device_batch(b)
    if kind == "eval":
        return net, arrays, step(arrays, b)
    for _ in range(n_calls):
        arrays, metrics = step(arrays, b)
    return net, arrays, metrics


def _close(a, b, what):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5, err_msg=what
    )


_CASES = [
    (kind, backend, 1) for kind in ("train", "post", "eval") for backend in _BACKENDS
] + [("train", backend, 2) for backend in _BACKENDS]


@pytest.mark.parametrize(
    "workload,kind,backend,k",
    [("tiny", *c) for c in _CASES]
    # dncnn: each kind once (the tiny cases cover every backend with each)
    + [
        ("dncnn", "train", "pmap", 1),
        ("dncnn", "train", "sharded", 1),
        ("dncnn", "post", "sharded", 1),
        ("dncnn", "eval", "pmap", 1),
        ("dncnn", "train", "sharded", 2),
    ],
)
def test_baseline_does_the_library_math(workload, kind, backend, k):
    sizes = w.QUICK_SIZES[workload]
    state, lib_metrics = _run_library(workload, sizes, kind, backend, k)
    net, arrays, raw_metrics = _run_raw(workload, sizes, kind, backend, k)
    for name in ("loss", "snr") if kind == "eval" else ("loss", "snr", "learning_rate"):
        _close(lib_metrics[name], raw_metrics[name], name)
    if kind == "eval":
        return
    step, params, net_state, *_ = w._unpack(net, arrays)
    assert int(state.step) == int(step) == 3 * k
    lib_params = w.raw_net(workload, state.model, state.model_state).params
    for i, (a, b) in enumerate(zip(lib_params, params)):
        _close(a, b, f"parameter {i}")
    lib_net_state = jax.tree_util.tree_leaves(state.model_state)
    assert len(lib_net_state) == len(net_state)
    for i, (a, b) in enumerate(zip(lib_net_state, net_state)):
        _close(a, b, f"model state leaf {i}")


def test_oihw_baseline_matches_hwio():
    sizes = w.QUICK_SIZES["dncnn"]
    _, a, m_oihw = _run_raw("dncnn", sizes, "train", "sharded", 1, layout="OIHW")
    _, b, m_hwio = _run_raw("dncnn", sizes, "train", "sharded", 1)
    _close(m_oihw["loss"], m_hwio["loss"], "loss")
    for x, y in zip(a, b):
        _close(x if x.ndim != 4 else x.transpose(2, 3, 1, 0), y, "array")


def test_single_device_jit_baseline_matches_pmap():
    sizes = w.QUICK_SIZES["tiny"]
    _, a, m_jit = _run_raw("tiny", sizes, "train", "jit", 1)
    _, b, m_pmap = _run_raw("tiny", sizes, "train", "pmap", 1)
    _close(m_jit["loss"], m_pmap["loss"], "loss")
    for x, y in zip(a, b):
        _close(x, y, "array")


def test_state_stays_replicated():
    # The parallel step keeps the state one global array replicated everywhere.
    state = w.library_state("tiny", w.SIZES["tiny"])
    step = w.library_step("train", "sharded")
    state, _ = step(state, w.batch("tiny", w.SIZES["tiny"]))
    leaf = jax.tree_util.tree_leaves(state.model)[0]
    assert len(leaf.sharding.device_set) == jax.device_count()
    assert es.DEVICE_AXIS == "device"

"""Time per step of the library's parallel steps beside hand-written baselines.

Every library case sits in one pytest-benchmark group with its baseline (the
same math in raw `jax.pmap`, raw `jax.jit` over `jax.shard_map`, or raw
`jax.jit`); `benchmarks/report.py` turns the groups into a table of ratios.

A round is `calls` calls feeding the returned state back in, then
`jax.block_until_ready`; time per step = round time / (calls * steps_per_call),
which `report.py` computes from `extra_info["steps_per_round"]`. The first call
(trace + compile + run) is timed separately as `extra_info["first_call_s"]`.
Both sides keep at most 8 calls in flight (the library's throttle; XLA:CPU's
collectives deadlock with dozens queued).

Each non-baseline case also times its group's baseline in rounds interleaved
with its own (`extra_info["partner_times"]`), so that the ratio compares two
measurements taken under the same load; the baseline's own test gives its
standalone figure. With `--benchmark-disable` every case runs once at small
sizes, and the dncnn cases that repeat a tiny case's code path are skipped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import pytest
import workloads as w
from memory import PeakRSS


@dataclasses.dataclass(frozen=True)
class Case:
    workload: str  # "tiny" | "dncnn"
    kind: str  # "train" | "post" | "eval"
    backend: str  # "pmap" | "sharded" | "jit" (raw single-device reference)
    impl: str  # "library" | "baseline"
    group: str
    label: str
    role: str = ""  # "library" | "baseline" | "reference" | "sweep"; default: impl
    donate: bool = True
    k: int = 1  # steps_per_call
    unroll: int | bool | str = True
    nan_policy: str = "ignore"  # same math as the baselines; "raise" measured apart
    layout: str = "HWIO"  # of the dncnn baseline's kernels

    @property
    def id(self) -> str:
        return f"{self.group}/{self.label}"

    @property
    def in_quick_run(self) -> bool:
        """Whether `--benchmark-disable` runs it: the dncnn cases that only repeat
        a code path the tiny cases already run are left out there."""
        return self.workload == "tiny" or (
            self.kind != "post"
            and self.donate
            and self.unroll in (1, True, "auto")
            and self.role not in ("reference", "sweep")
        )


def _cases() -> list[Case]:
    cases = []
    for wl in ("tiny", "dncnn"):
        for be in ("pmap", "sharded"):
            raw = f"raw-{be}"

            def add(group, label, impl, **kw):
                kw.setdefault("backend", be)
                kw.setdefault("kind", "train")
                cases.append(
                    Case(wl, group=f"{wl}-{group}-{be}", label=label, impl=impl, **kw)
                )

            for kind in ("train", "post", "eval"):
                add(kind, "library", "library", kind=kind)
                add(kind, raw, "baseline", kind=kind)
                if wl == "dncnn" and kind != "post":
                    # the baseline with the kernels laid out as the model keeps them
                    add(
                        kind,
                        f"{raw}-oihw",
                        "baseline",
                        kind=kind,
                        layout="OIHW",
                        role="reference",
                    )
            add("nodonate", "library", "library", donate=False)
            add("nodonate", raw, "baseline", donate=False)
            # The unroll of the scan over the steps of a call. "auto" (the
            # default) unrolls fully on CPU for steps with convolutions and keeps
            # the loop rolled otherwise. XLA:CPU runs any rolled loop over
            # convolutions some 30x slower (unroll=1, 2 and 5 alike), so the
            # dncnn sweep runs those settings once, on the default backend only
            # ("sweep": one round, never rerun by report.py). For tiny, "auto" is
            # a rolled loop; True shows the other choice.
            # (A list, not a dict: 1 == True.)
            if wl == "tiny":
                unrolls = [("auto", "library"), (True, "library")]
            elif be == "pmap":
                unrolls = [
                    (1, "sweep"),
                    (2, "sweep"),
                    (5, "sweep"),
                    ("auto", "library"),
                ]
            else:
                unrolls = [("auto", "library")]
            for u, role in unrolls:
                add("k10", f"library-unroll={u}", "library", k=10, unroll=u, role=role)
            add("k10", f"{raw}-unroll=True", "baseline", k=10, unroll=True)
            if wl == "tiny":
                # the target: 10 steps per call vs one raw single-device jit step
                add("k10", "raw-jit-1step", "baseline", backend="jit", role="reference")
                add("nan", "library-raise", "library", nan_policy="raise")
                add("nan", "library-ignore", "library")
                add("nan", raw, "baseline")
            else:
                add("k10", "library-1step", "library", role="reference")
    return cases


CASES = _cases()


def _rounds(case: Case, quick: bool) -> tuple[int, int, int]:
    """(calls per round, rounds, warm-up rounds)."""
    if quick:
        return 2, 1, 0
    if case.role == "sweep":
        return 1, 1, 0
    if case.workload == "tiny":
        return max(1, 200 // case.k), 15, 2
    return (2, 10, 1) if case.k == 1 else (1, 4, 1)


def _setup(case: Case, quick: bool):
    """Build the case: `(run, first)` where `run(n)` makes n calls and blocks."""
    sizes = (w.QUICK_SIZES if quick else w.SIZES)[case.workload]
    k = 2 if quick and case.k > 1 else case.k
    b = w.batch(case.workload, sizes, steps_per_call=k)
    if case.impl == "library":
        state = w.library_state(case.workload, sizes)
        step = w.library_step(
            case.kind,
            case.backend,
            donate=case.donate,
            steps_per_call=k,
            unroll=case.unroll,
            nan_policy=case.nan_policy,
        )
        if case.kind == "eval":
            # Evaluate a trained (replicated) state, as a trainer does.
            train = w.library_step("train", case.backend, donate=False)
            state, _ = train(state, w.batch(case.workload, sizes))
            jax.block_until_ready(state)

            def run(n):
                for _ in range(n):
                    m = step(state, b)
                jax.block_until_ready(m)

        else:
            holder = [state]

            def run(n):
                s = holder[0]
                for _ in range(n):
                    s, m = step(s, b)  # with donate, the old state is consumed
                holder[0] = s
                jax.block_until_ready((s, m))

        return run, k

    net = w.raw_net(
        case.workload, *w.library_model(case.workload, sizes), layout=case.layout
    )
    arrays = w.place_raw_state(w.raw_state(net), case.backend)
    step = w.raw_step(
        net,
        case.kind,
        case.backend,
        donate=case.donate,
        steps_per_call=k,
        unroll=case.unroll,
    )
    if case.backend == "jit":
        b = w.single_device_batch(b)
    throttle = w.Throttle(1 if case.backend == "jit" else None)
    if case.kind == "eval":

        def run(n):
            for _ in range(n):
                m = step(arrays, b)
                throttle(m)
            jax.block_until_ready(m)

    else:
        holder = [arrays]

        def run(n):
            a = holder[0]
            for _ in range(n):
                a, m = step(a, b)
                throttle(m)
            holder[0] = a
            jax.block_until_ready((a, m))

    return run, k


BASELINES = {c.group: c for c in CASES if c.impl == "baseline" and not c.role}


@dataclasses.dataclass
class Built:
    run: Callable[[int], None]  # run(n): n calls, then block
    k: int  # steps per call
    first_call_s: float
    peak_rss_mb: float  # rise of the peak RSS over building and the first call


_built: dict[str, Built] = {}


def build(case: Case, quick: bool) -> Built:
    """Build and compile a case once; a group's baseline is shared by its tests."""
    if case.id not in _built:
        for key in [key for key in _built if not key.startswith(case.group + "/")]:
            del _built[key]  # one group at a time
        peak = PeakRSS()
        peak.reset()
        run, k = _setup(case, quick)
        t0 = time.perf_counter()
        run(1)  # trace, compile, run once
        first = time.perf_counter() - t0
        _built[case.id] = Built(run, k, first, peak.increase_mb())
    return _built[case.id]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_step(benchmark, case: Case, quick: bool):
    if quick and not case.in_quick_run:
        pytest.skip("same code path as a tiny case; timed with --benchmark-only")
    calls, rounds, warmup = _rounds(case, quick)
    me = build(case, quick)
    benchmark.group = case.group
    benchmark.extra_info.update(
        dataclasses.asdict(case),
        devices=jax.device_count(),
        steps_per_call=me.k,
        steps_per_round=calls * me.k,
        first_call_s=me.first_call_s,
        peak_rss_mb=me.peak_rss_mb,
        role=case.role or case.impl,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        load_avg=os.getloadavg()[0],
    )
    setup = None
    base = BASELINES[case.group]
    if base is not case and not quick:
        # Interleave: before each round of this case, one round of the group's
        # baseline, timed here. Both then see the same load, and report.py takes
        # the ratio from these pairs.
        partner = build(base, quick)
        p_calls = _rounds(base, quick)[0]
        times: list[float] = []

        def setup():
            t0 = time.perf_counter()
            partner.run(p_calls)
            times.append(time.perf_counter() - t0)

        benchmark.extra_info.update(
            partner=base.label,
            partner_steps_per_round=p_calls * partner.k,
            partner_times=times,  # filled in as the rounds run
            partner_warmup_rounds=warmup,
        )
    benchmark.pedantic(
        me.run, args=(calls,), setup=setup, rounds=rounds, warmup_rounds=warmup
    )

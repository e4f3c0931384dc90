"""The README's "In one screen" snippet, run exactly as written, with and without
the XLA flag.

A user who copies the snippet sets no `XLA_FLAGS`. The library compiles its own
programs with the fast XLA:CPU options (`eqx_steps.platform.compiler_options`),
so the snippet should run as fast as with
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`
(the library's setting: reductions to YNNPACK, convolutions to XLA). This runs
the snippet's code block, taken from README.md as it is, in fresh processes that
alternate between no `XLA_FLAGS` at all and the flag, and compares their time
per step.

The snippet leaves `MyNet`, `batches` and `test_batch` to the reader; here
`MyNet` is `eqx_steps.models.DnCNN` (depth 6, 32 filters, one channel: the
issue's workload) and `batches` yields `(16, 64, 64, 1)` batches, timing each
step from one batch to the next (the default `nan_policy="raise"` reads a flag
back after every step, so the host waits for each one). The first two steps
(compilation) are left out.

    python benchmarks/readme_snippet.py --repeats 3 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
FULL = {"depth": 6, "filters": 32, "hw": 64, "batch": 16}
QUICK = {"depth": 2, "filters": 4, "hw": 16, "batch": 4}


def snippet() -> str:
    """The first Python block under the README's "## In one screen" heading."""
    text = README.read_text()
    section = text.split("## In one screen", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, "README.md: no Python block under 'In one screen'"
    return found.group(1)


# What the snippet leaves to the reader, defined before it runs; then the times.
_PRELUDE = """
import functools, time
import numpy as np
from eqx_steps.models import DnCNN

SIZES = {sizes!r}
MyNet = functools.partial(
    DnCNN, depth=SIZES["depth"], channels=1, num_filters=SIZES["filters"]
)
_shape = (SIZES["batch"], SIZES["hw"], SIZES["hw"], 1)
_rng = np.random.default_rng(0)
_label = _rng.normal(size=_shape).astype(np.float32)
test_batch = {{"image": _label + 0.1 * _rng.normal(size=_shape).astype(np.float32),
               "label": _label}}
_times = []

def _batches(n):
    for _ in range(n):
        _times.append(time.perf_counter())
        yield test_batch
    _times.append(time.perf_counter())

batches = _batches({steps})
"""
_EPILOGUE = """
import json, os
_steps = np.diff(_times)[2:]
print("RESULT " + json.dumps({{
    "median_s": float(np.median(_steps)), "min_s": float(np.min(_steps)),
    "first_s": float(_times[1] - _times[0]), "xla_flags": os.environ.get("XLA_FLAGS"),
}}))
"""


def run_once(flagged: bool, sizes: dict, steps: int) -> dict:
    """One fresh process running the snippet; `flagged`: with the XLA flag,
    else with no `XLA_FLAGS` at all."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    if flagged:
        env["XLA_FLAGS"] = FLAG
    code = _PRELUDE.format(sizes=sizes, steps=steps) + snippet() + _EPILOGUE.format()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"the snippet failed:\n{out.stderr[-3000:]}")
    line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return {"flagged": flagged, **json.loads(line[len("RESULT ") :])}


def compare(repeats: int, steps: int, sizes: dict) -> dict:
    """Alternating runs; the ratio of the medians of the runs' medians (no flag
    / flag) and every run."""
    runs = []
    for _ in range(repeats):
        runs.append(run_once(True, sizes, steps))
        runs.append(run_once(False, sizes, steps))
    by = {
        f: statistics.median(r["median_s"] for r in runs if r["flagged"] is f)
        for f in (True, False)
    }
    return {
        "no_flag_s": by[False],
        "flag_s": by[True],
        "ratio": by[False] / by[True],
        "runs": runs,
        "load": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="tiny DnCNN")
    args = parser.parse_args(argv)
    result = compare(args.repeats, args.steps, QUICK if args.quick else FULL)
    for r in result["runs"]:
        print(json.dumps(r))
    print(
        f"no flag {1e3 * result['no_flag_s']:.1f} ms / step, flag "
        f"{1e3 * result['flag_s']:.1f} ms / step, ratio {result['ratio']:.3f} "
        f"(load {result['load'][0]:.2f})"
    )


if __name__ == "__main__":
    main()

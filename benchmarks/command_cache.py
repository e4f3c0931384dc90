"""Time to the first step of `eqx-steps train`, with a cold and a warm
compilation cache.

Each run is a fresh `python -m eqx_steps train` process (the command's default
model: DnCNN depth 6, 32 filters, 32x32 patches, batch 16) on a training set of
one batch, so that its first record is its first step: the record's `"time"` is
the time from the trainer's start to the end of that step (the trainer's state
and steps are built, the training step and the placement compiled, one step
run). Also reported: the whole process's wall time (imports, data, the
evaluation, the checkpoint and the pictures included).

Order: one run with `--compilation-cache off`, one with an empty cache folder
(cold: it fills the cache), then `--repeats` runs with that folder (warm),
alternating with runs with the cache off.

    python benchmarks/command_cache.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


ARGS = ["--train-size", "16", "--test-size", "16", "--batch-size", "16",
        "--epochs", "1", "--devices", "1"]  # fmt: skip
QUICK_ARGS = ["--depth", "2", "--filters", "4", "--patch", "8", "--train-size",
              "8", "--test-size", "8", "--batch-size", "8", "--epochs", "1",
              "--devices", "1"]  # fmt: skip


def run_once(out: str, cache: str, quick: bool) -> dict:
    """One fresh `eqx-steps train` process; its first step and wall time."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # as a user runs it
    env.pop("EQX_STEPS_COMPILATION_CACHE", None)
    args = QUICK_ARGS if quick else ARGS
    argv = [sys.executable, "-m", "eqx_steps", "train", *args,
            "--out", out, "--compilation-cache", cache]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"eqx-steps train failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    return {"cache": cache, "first_step_s": first["time"], "wall_s": wall}


def compare(repeats: int, quick: bool) -> dict:
    """Cold, then warm runs alternating with cache-off runs; medians and ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        n = iter(range(1000))
        runs = [run_once(os.path.join(tmp, f"run{next(n)}"), "off", quick)]
        cold = run_once(os.path.join(tmp, f"run{next(n)}"), cache, quick)
        cold["cache"] = "cold"
        runs.append(cold)
        for _ in range(repeats):
            warm = run_once(os.path.join(tmp, f"run{next(n)}"), cache, quick)
            warm["cache"] = "warm"
            runs.append(warm)
            runs.append(run_once(os.path.join(tmp, f"run{next(n)}"), "off", quick))
    med = {
        kind: {
            key: statistics.median(r[key] for r in runs if r["cache"] == kind)
            for key in ("first_step_s", "wall_s")
        }
        for kind in ("off", "cold", "warm")
    }
    return {
        "medians": med,
        "ratio_first_step": med["off"]["first_step_s"] / med["warm"]["first_step_s"],
        "ratio_wall": med["off"]["wall_s"] / med["warm"]["wall_s"],
        "runs": runs,
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    r = compare(args.repeats, args.quick)
    for run in r["runs"]:
        print(json.dumps(run))
    m = r["medians"]
    print(
        f"first step: off {m['off']['first_step_s']:.2f} s, cold "
        f"{m['cold']['first_step_s']:.2f} s, warm {m['warm']['first_step_s']:.2f} s: "
        f"off / warm {r['ratio_first_step']:.2f}x; whole process: off "
        f"{m['off']['wall_s']:.1f} s, warm {m['warm']['wall_s']:.1f} s "
        f"({r['ratio_wall']:.2f}x) (load {r['load']:.2f})"
    )


if __name__ == "__main__":
    main()

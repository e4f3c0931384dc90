"""Regenerate the pictures of the documentation, and the README's sample output,
from the current code.

    python docs/make_pictures.py            # all of them
    python docs/make_pictures.py train      # curves.png, samples.png, README block
    python docs/make_pictures.py photo      # kodim23-denoised.png
    python docs/make_pictures.py scaling    # scaling.png, from performance.md's table

- `train`: runs `eqx-steps train --devices 2` (the default run of the README) in a
    fresh process, copies its `curves.png` and `samples.png` here and writes its
    output into README.md between the `eqx-steps train output` markers (the
    tables and the log lines shortened). `tests/test_docs.py` checks that block
    against what the command prints.
- `photo`: runs `examples/train_denoiser.py` on Kodak's `kodim23.png` (the
    `--photo` option, default `../shared/data/kodim23.png` beside the repository;
    without it, the crop shipped in `examples/data/`).
- `scaling`: redraws `scaling.png` from the table of measurements in
    `performance.md` (`benchmarks/report.py` draws it the same way from the
    benchmark JSON files).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time


DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
README = ROOT / "README.md"
BEGIN = "<!-- eqx-steps train output: docs/make_pictures.py writes this block -->"
END = "<!-- end of eqx-steps train output -->"
SHOWN_RUN = "runs/dncnn-20261203-021500"  # the run folder the README shows


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def shorten(output: str) -> str:
    """The command's output as the README shows it: each table cut to its first
    row and its total, the first and the last log line, the progress bar's last
    state."""
    lines = [line.split("\r")[-1].rstrip() for line in output.splitlines()]
    out: list[str] = []
    table: list[str] = []
    log: list[str] = []
    bar = ""
    for line in lines:
        if line.startswith(("+-", "| ")):
            table.append(line)
            continue
        if table:  # a table ended: its columns, its first row, how many rows
            rows = [r.strip("| ").split(" | ") for r in table if r.startswith("| ")]
            columns = ", ".join(c.strip() for c in rows[0])
            first = rows[1][0].strip() if len(rows) > 1 else ""
            out.append(f"  ({len(rows) - 1} rows of {columns}: {first}, ...)")
            table = []
        if not line.strip():
            continue
        if re.match(r"step \d+ \(epoch \d+\): ", line):
            log.append(line)
        elif line.startswith("train:"):
            bar = line
        else:
            if log:
                more = f"  ({len(log) - 2} more lines, one per log point)"
                out += [log[0], more, log[-1], bar]
                log = []
            out.append(line)
    return "\n".join(out)


def normalized(text: str, run_folder: str) -> list[str]:
    """The lines of a shortened output with what changes from run to run taken
    out: the run folder, every number, plurals of counts, the progress bar
    (tqdm's), spacing."""
    lines = []
    for line in text.replace(run_folder, "RUN").splitlines():
        if line.startswith("train:"):
            continue
        if not line.strip():
            continue
        line = re.sub(r"[-+]?\d+(,\d{3})*(\.\d+)?(e[-+]?\d+)?", "N", line)
        line = re.sub(r"N(, N)+", "N", line)
        line = re.sub(r"\b(N (?:epoch|step|row|line))s\b", r"\1", line)
        lines.append(" ".join(line.split()))
    return lines


def train(devices: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "runs", "dncnn")
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "eqx_steps", "train", "--devices", str(devices),
             "--out", run],
            capture_output=True, text=True, env=_env(), cwd=tmp, check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        (ROOT / "build").mkdir(exist_ok=True)  # the whole output, for a look
        (ROOT / "build" / "train-output.txt").write_text(result.stdout)
        if result.returncode:
            sys.exit(f"eqx-steps train failed:\n{result.stderr[-3000:]}")
        for name in ("curves.png", "samples.png"):
            shutil.copyfile(os.path.join(run, name), DOCS / name)
    text = shorten(result.stdout).replace(run, SHOWN_RUN)
    readme = README.read_text()
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    README.write_text(f"{head}{BEGIN}\n```\n{text}\n```\n{END}{tail}")
    load = os.getloadavg()[0]
    print(f"train: {seconds:.0f} s on {devices} devices (load {load:.1f}); wrote "
          "docs/curves.png, docs/samples.png and README.md's block")  # fmt: skip


def photo(path: str | None) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "train_denoiser.py")]
    cmd += [path] if path else []
    cmd += ["--picture", str(DOCS / "kodim23-denoised.png")]
    start = time.perf_counter()
    subprocess.run(cmd, env=_env(), check=True)
    seconds = time.perf_counter() - start
    print(f"photo: {seconds:.0f} s; wrote docs/kodim23-denoised.png")


def scaling() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    rows = report.scaling_rows_from_markdown((DOCS / "performance.md").read_text())
    report.draw_scaling(rows, str(DOCS / "scaling.png"))
    print(f"scaling: {len(rows)} measurements; wrote docs/scaling.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", help="train, photo, scaling (default: all)")
    kodim = ROOT.parent / "shared" / "data" / "kodim23.png"
    parser.add_argument(
        "--photo", default=str(kodim) if kodim.exists() else None, help="kodim23.png"
    )
    args = parser.parse_args(argv)
    what = args.what or ["train", "photo", "scaling"]
    if set(what) - {"train", "photo", "scaling"}:
        parser.error(f"unknown {what}: choose among train, photo, scaling")
    if "scaling" in what:
        scaling()
    if "train" in what:
        train()
    if "photo" in what:
        photo(args.photo)


if __name__ == "__main__":
    main()

"""Run the benchmark suite and print its results as a Markdown table.

    python benchmarks/report.py                       # 1 and 4 devices, all cases
    python benchmarks/report.py --update-doc docs/performance.md
    python benchmarks/report.py --from-json .benchmarks/report/*.json

The suite runs once per device count, each in its own process
(`EQX_STEPS_BENCH_DEVICES=n pytest benchmarks --benchmark-only
--benchmark-json=...`), since XLA fixes the number of CPU devices per process.
A ratio is only as good as the quiet of the machine, so every group (a library
case and its baseline) is measured again until two runs in a row agree on all
its ratios within `--tolerance` (3%), or `--max-runs` is reached; unstable
groups are marked in the table. Reported times are per step (time per call /
steps_per_call), the `--stat` (default `min`) over rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from importlib.metadata import version


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEGIN, END = "<!-- benchmark-report:begin -->", "<!-- benchmark-report:end -->"


# ---------------------------------------------------------------------------
# Running the suite.


def run_suite(n_devices: int, json_path: str, select: list[str], extra: list[str]):
    env = dict(os.environ, EQX_STEPS_BENCH_DEVICES=str(n_devices))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *select,
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "-q",
        "-p",
        "no:cacheprovider",
        *extra,
    ]
    print(f"$ EQX_STEPS_BENCH_DEVICES={n_devices} {' '.join(cmd[2:])}", file=sys.stderr)
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=False, text=True)
    if out.returncode not in (0, 5):  # 5: nothing selected
        raise SystemExit(f"the benchmark run failed (exit code {out.returncode})")


def load(paths: list[str]) -> list[dict]:
    """Benchmarks of pytest-benchmark JSON files, tagged with the file's order."""
    records = []
    for order, path in enumerate(paths):
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            b["_order"] = order
            b["_machine"] = data.get("machine_info", {})
            b["_when"] = data.get("datetime")
            records.append(b)
    return records


# ---------------------------------------------------------------------------
# Turning records into groups, ratios and tables.


def per_step(b: dict, stat: str) -> float:
    return b["stats"][stat] / b["extra_info"].get("steps_per_round", 1)


def _stat(values: list[float], stat: str) -> float:
    values = sorted(values)
    if stat == "min":
        return values[0]
    if stat == "mean":
        return sum(values) / len(values)
    n = len(values)
    return (values[(n - 1) // 2] + values[n // 2]) / 2


def partner_per_step(b: dict, stat: str) -> float | None:
    """The baseline's time per step from the rounds interleaved with `b`'s."""
    info = b["extra_info"]
    times = info.get("partner_times", [])[info.get("partner_warmup_rounds", 0) :]
    if not times:
        return None
    return _stat(times, stat) / info["partner_steps_per_round"]


def step_groups(records: list[dict]) -> dict:
    """`{(devices, group): [run, ...]}`, oldest run first; a run is
    `{label: record}` for the benchmarks of the group measured in that run."""
    runs = defaultdict(lambda: defaultdict(dict))
    for b in records:
        info = b["extra_info"]
        if b["group"] == "memory" or "label" not in info:
            continue
        runs[(info["devices"], b["group"])][b["_order"]][info["label"]] = b
    return {key: [r[o] for o in sorted(r)] for key, r in runs.items()}


def _baseline(run: dict) -> dict | None:
    base = [b for b in run.values() if b["extra_info"]["role"] == "baseline"]
    return base[0] if len(base) == 1 else None


def base_per_step(b: dict, base: dict) -> float:
    """The baseline's time per step to compare `b` with: from the rounds
    interleaved with `b`'s where there are some, else from its own test."""
    t = partner_per_step(b, STAT)
    return per_step(base, STAT) if t is None else t


def ratios(run: dict, roles=("library", "reference", "sweep")) -> dict:
    """`{label: time per step / the baseline's}` within one run."""
    base = _baseline(run)
    if base is None:
        return {}
    return {
        label: per_step(b, STAT) / base_per_step(b, base)
        for label, b in run.items()
        if b["extra_info"]["role"] in roles
    }


def latest(runs: list[dict]) -> dict:
    """`{label: (record, baseline of its run, ratio)}`, the newest of each."""
    out = {}
    for run in runs:
        base = _baseline(run)
        if base is None:
            continue
        r = ratios(run)
        for label, b in run.items():
            if b is not base:
                out[label] = (b, base, r[label])
    return out


def stable(runs: list[dict], tolerance: float) -> bool:
    """Whether the last two runs of a group agree on its (non-sweep) ratios."""
    measured = [ratios(r, ("library", "reference")) for r in runs]
    measured = [m for m in measured if m]
    if len(measured) < 2:
        return False
    a, b = measured[-1], measured[-2]
    return a.keys() == b.keys() and all(abs(a[k] / b[k] - 1) <= tolerance for k in a)


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _case_name(group: str, label: str, n_library: int) -> str:
    workload, kind, backend = group.split("-")
    kind = {
        "train": "train",
        "post": "train + clip_range",
        "eval": "eval",
        "nodonate": "train, donate=False",
        "k10": "steps_per_call=10",
        "nan": "nan_policy",
    }[kind]
    name = f"{workload} {backend} {kind}"
    if label.startswith("library-"):
        name += " " + label[len("library-") :].replace("1step", "1 step per call")
    elif label != "library" or n_library > 1:
        name += f" ({label})"
    return name


def case_rows(groups: dict):
    """`(devices, runs, case name, record, baseline, ratio)` for the newest
    measurement of every case, in the order of the table."""
    for (devices, group), runs in sorted(
        groups.items(), key=lambda kv: (kv[0][1].split("-")[0], kv[0][1], kv[0][0])
    ):
        rows = latest(runs)
        n_library = sum(
            b["extra_info"]["role"] != "reference" for b, _, _ in rows.values()
        )
        for label, (b, base, ratio) in rows.items():
            yield devices, runs, _case_name(group, label, n_library), b, base, ratio


def steps_table(groups: dict, tolerance: float) -> list[str]:
    lines = [
        "| case | devices | library / step | baseline / step | ratio "
        "| first call lib / base | peak RSS lib / base | stable |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for devices, runs, name, b, base, ratio in case_rows(groups):
        ok = "yes" if stable(runs, tolerance) else f"no ({len(runs)} runs)"
        info, binfo = b["extra_info"], base["extra_info"]
        lines.append(
            f"| {name} | {devices} "
            f"| {fmt_time(per_step(b, STAT))} "
            f"| {fmt_time(base_per_step(b, base))} ({binfo['label']}) "
            f"| {ratio:.3f} "
            f"| {info['first_call_s']:.2f} / {binfo['first_call_s']:.2f} s "
            f"| {info.get('peak_rss_mb', 0):.0f} / "
            f"{binfo.get('peak_rss_mb', 0):.0f} MB "
            f"| {'once' if info['role'] == 'sweep' else ok} |"
        )
    return lines


def ratio_chart(groups: dict, path: str) -> None:
    """Draw the ratios of the library cases (not the reference rows or the unroll
    sweep) as horizontal bars, one per device count, and write them to the PNG
    `path` (through a temporary file, so a reader never sees half a picture)."""
    from matplotlib.figure import Figure

    ratios_by_case = defaultdict(dict)
    for devices, _, name, b, _, ratio in case_rows(groups):
        if b["extra_info"]["role"] == "library":
            ratios_by_case[name][devices] = ratio
    cases = list(ratios_by_case)
    counts = sorted({d for r in ratios_by_case.values() for d in r})
    height = 0.8 / max(len(counts), 1)
    fig = Figure(figsize=(8, 0.32 * len(cases) * len(counts) + 1.4))
    ax = fig.subplots()
    for i, devices in enumerate(counts):
        values = [ratios_by_case[c].get(devices, float("nan")) for c in cases]
        ys = [k + i * height for k in range(len(cases))]
        label = f"{devices} device{'s' * (devices > 1)}"
        bars = ax.barh(ys, values, height, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(
        [k + height * (len(counts) - 1) / 2 for k in range(len(cases))], cases
    )
    ax.tick_params(axis="y", labelsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time per step: library / hand-written JAX (lower is better)")
    ax.set_xlim(0, 1.12 * max(max(r.values()) for r in ratios_by_case.values()))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(counts))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def memory_table(records: list[dict]) -> list[str]:
    rows = defaultdict(dict)
    for b in records:
        if b["group"] != "memory":
            continue
        info = b["extra_info"]
        rows[(info["devices"], info["impl"])][info["donate"]] = info
    if not rows:
        return []
    lines = [
        "| implementation | devices | params | peak RSS, donate / no donate "
        "| ratio | XLA peak per device, donate / no donate | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (devices, impl), d in sorted(rows.items()):
        if True not in d or False not in d:
            continue
        on, off = d[True], d[False]
        # RSS above the process after importing JAX, over the steps after the first
        rss_on = on["steps_peak_mb"] - on["base_mb"]
        rss_off = off["steps_peak_mb"] - off["base_mb"]
        xla = ""
        if "xla_peak_mb" in on and "xla_peak_mb" in off:
            xla = (
                f"{on['xla_peak_mb']:.0f} / {off['xla_peak_mb']:.0f} MB "
                f"| {on['xla_peak_mb'] / off['xla_peak_mb']:.3f}"
            )
        else:
            xla = "n/a | n/a"
        lines.append(
            f"| {impl} | {devices} | {on['params'] / 1e6:.1f}M "
            f"| {rss_on:.0f} / {rss_off:.0f} MB | {rss_on / rss_off:.3f} | {xla} |"
        )
    return lines


LOOP_TARGETS = {"tiny": 1.5, "dncnn": 1.05}
"""The trainer's targets against its bare loop; the command has none: its
evaluations and checkpoints are work a bare loop does not do."""


def _beyond_steps(r: dict) -> str:
    """The command's evaluations and checkpoint saves, per step and as a share of
    its difference from the bare loop; "-" for the trainer."""
    if "eval_s" not in r:
        return "-"
    diff = _stat(r["trainer_s"], "median") - _stat(r["bare_s"], "median")
    share = (r["eval_s"] + r["checkpoint_s"]) / diff if diff > 0 else float("nan")
    return (
        f"{r['evaluations']} evals {fmt_time(r['eval_s'])} + {r['checkpoints']} "
        f"saves {fmt_time(r['checkpoint_s'])} ({share:.0%} of the difference)"
    )


def loop_table(records: list[dict]) -> list[str]:
    """`test_loop.py` and `test_command.py`: the trainer's (or `eqx-steps
    train`'s) time per step beside a bare loop of its step, and what the command
    spends on evaluations and checkpoints (per step of the timed interval)."""
    rows = [b["extra_info"] for b in records if b["group"] == "loop"]
    if not rows:
        return []
    lines = [
        "| workload | backend | devices | steps | trainer | bare loop "
        "| ratio (medians) | evaluations and checkpoints | target |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["workload"], r["backend"], r["devices"])):
        trainer, bare = _stat(r["trainer_s"], "median"), _stat(r["bare_s"], "median")
        target = LOOP_TARGETS.get(r["workload"])
        verdict = (
            "-"
            if target is None
            else f"<= {target} {'met' if trainer / bare <= target else 'missed'}"
        )
        lines.append(
            f"| {r['workload']} | {r['backend']} | {r['devices']} | {r['steps']} "
            f"| {fmt_time(trainer)} | {fmt_time(bare)} | {trainer / bare:.3f} "
            f"| {_beyond_steps(r)} | {verdict} |"
        )
    return lines


def scaling_rows(records: list[dict]) -> list[dict]:
    """`test_scaling.py`'s records: per-step medians of library and baseline."""
    rows = []
    for b in records:
        if b["group"] != "scaling":
            continue
        r = dict(b["extra_info"])
        r["library"] = _stat(r["library_s"], "median")
        r["baseline"] = _stat(r["baseline_s"], "median")
        rows.append(r)
    return rows


def scaling_plot(records: list[dict], path: str) -> list[str]:
    """Plot step time against batch, image size and devices into `path` (PNG);
    returns a markdown table of the points."""
    rows = scaling_rows(records)
    if not rows:
        return []
    draw_scaling(rows, path)
    lines = [
        "| devices | backend | batch | image | library | baseline | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["devices"], r["backend"], r["batch"], r["hw"])
    ):
        lines.append(
            f"| {r['devices']} | {r['backend']} | {r['batch']} | {r['hw']} "
            f"| {fmt_time(r['library'])} | {fmt_time(r['baseline'])} "
            f"| {r['library'] / r['baseline']:.3f} |"
        )
    return lines


_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def scaling_rows_from_markdown(text: str) -> list[dict]:
    """The scaling measurements of the table `scaling_plot` returns, read back
    from a page that holds it (`docs/performance.md`): the same rows as
    `scaling_rows`, at the table's precision."""
    head = "| devices | backend | batch | image | library | baseline | ratio |"
    lines = text[text.index(head) :].splitlines()[2:]
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 7:
            break
        devices, backend, batch, hw, library, baseline, _ = cells

        def seconds(cell: str) -> float:
            value, unit = cell.split()
            return float(value) * _UNITS[unit]

        rows.append(
            {
                "devices": int(devices),
                "backend": backend,
                "batch": int(batch),
                "hw": int(hw),
                # test_scaling.py's batch sweep is at 64x64, the size sweep at 16.
                "axis": "batch" if int(hw) == 64 else "hw",
                "library": seconds(library),
                "baseline": seconds(baseline),
            }
        )
    return rows


def draw_scaling(rows: list[dict], path: str) -> None:
    """Draw the three panels of step time against batch, image side and devices.

    Colour is the backend and the line style the role (library solid, baseline
    dashed), told once in a legend above the panels; each panel's own small
    legend gives its markers (the device counts, or the batch sizes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.0))
    # (x key, which rows, the key that tells the curves apart, x label)
    panels = [
        ("batch", lambda r: r["axis"] == "batch", "devices", "global batch (64x64)"),
        ("hw", lambda r: r["batch"] == 16, "devices", "image side (batch 16)"),
        ("devices", lambda r: r["hw"] == 64, "batch", "devices (64x64)"),
    ]
    markers = "osD^v"
    colors = {"pmap": "C0", "sharded": "C1"}
    for ax, (key, keep, series, label) in zip(axes, panels):
        curves: dict[tuple, dict] = {}
        for r in rows:
            if keep(r):
                for role in ("library", "baseline"):
                    curve = curves.setdefault((r["backend"], role, r[series]), {})
                    curve[r[key]] = r[role]
        values = sorted({c[2] for c in curves if len(curves[c]) >= 2})
        for (backend, role, value), points in sorted(curves.items()):
            if len(points) < 2:
                continue
            xs = sorted(points)
            ax.plot(
                xs,
                [points[x] * 1e3 for x in xs],
                "-" if role == "library" else "--",
                marker=markers[values.index(value) % len(markers)],
                color=colors.get(backend, "C2"),
                alpha=1.0 if role == "library" else 0.6,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("ms per step")
        ax.grid(alpha=0.3, which="both")
        handles = [
            Line2D([], [], color="0.3", linestyle="", marker=markers[i % len(markers)])
            for i in range(len(values))
        ]
        ax.legend(
            handles,
            [str(v) for v in values],
            fontsize=8,
            title=series,
            title_fontsize=8,
            loc="upper left" if key != "devices" else "lower right",
        )
    fig.legend(
        [
            Line2D([], [], color=colors["pmap"], linewidth=3),
            Line2D([], [], color=colors["sharded"], linewidth=3),
            Line2D([], [], color="0.3", linestyle="-"),
            Line2D([], [], color="0.3", linestyle="--", alpha=0.6),
        ],
        ["backend pmap", "backend sharded", "library", "hand-written baseline"],
        loc="upper center",
        ncol=4,
        fontsize=9,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------
# The targets of the issue.


def targets(groups: dict, records: list[dict]) -> list[str]:
    out = []

    def ratio(devices, group, label):
        row = latest(groups.get((devices, group), [])).get(label)
        return None if row is None else row[2]

    def t(devices, group, label):
        row = latest(groups.get((devices, group), [])).get(label)
        return None if row is None else per_step(row[0], STAT)

    def check(name, value, limit):
        if value is None:
            return
        if limit is None:  # context, not a target
            out.append(f"| {name} | {value:.3f} | | |")
            return
        verdict = "met" if value <= limit else "**missed**"
        out.append(f"| {name} | {value:.3f} | <= {limit} | {verdict} |")

    for devices in sorted({d for d, _ in groups}):
        for be in ("pmap", "sharded"):
            for kind in ("train", "post", "eval"):
                lib = ratio(devices, f"dncnn-{kind}-{be}", "library")
                check(
                    f"dncnn {kind} {be}, {devices} dev: library / baseline", lib, 1.03
                )
                oihw = ratio(devices, f"dncnn-{kind}-{be}", f"raw-{be}-oihw")
                if lib and oihw:
                    check(
                        f"(for reference) dncnn {kind} {be}, {devices} dev: library / "
                        "baseline with the model's OIHW kernels",
                        lib / oihw,
                        None,
                    )
        check(
            f"tiny pmap, {devices} dev: library / raw jax.pmap",
            ratio(devices, "tiny-train-pmap", "library"),
            2.0,
        )
        check(
            f"tiny sharded, {devices} dev: library / raw jit(shard_map)",
            ratio(devices, "tiny-train-sharded", "library"),
            1.5,
        )
        for be in ("pmap", "sharded"):
            g = f"tiny-k10-{be}"
            k10, ref = (
                t(devices, g, "library-unroll=auto"),
                t(devices, g, "raw-jit-1step"),
            )
            if k10 and ref:
                check(
                    f"tiny {be} steps_per_call=10, {devices} dev: per step / raw "
                    "single-step jax.jit (one device, no collective)",
                    k10 / ref,
                    0.6,
                )
            one = [_baseline(r) for r in groups.get((devices, f"tiny-train-{be}"), [])]
            one = per_step(one[-1], STAT) if one and one[-1] else None
            if k10 and one and devices > 1:
                check(
                    f"(for reference) tiny {be} steps_per_call=10, {devices} dev: per "
                    f"step / raw single-step {be}",
                    k10 / one,
                    None,
                )
            g = f"dncnn-k10-{be}"
            one = t(devices, g, "library-1step")
            unrolls = {
                label.split("=")[1]: t(devices, g, label)
                for label in latest(groups.get((devices, g), []))
                if label.startswith("library-unroll=")
            }
            if one and unrolls:
                best = min(unrolls, key=unrolls.get)
                check(
                    f"dncnn {be} steps_per_call=10 (best unroll={best}), {devices} dev:"
                    " per step / 1 step per call",
                    unrolls[best] / one,
                    1.0,
                )
    for line in memory_table(records)[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("library", "library-split"):
            what = f"memory ({cells[0]}), {cells[1]} dev"
            check(f"{what}: peak RSS donate / no donate", float(cells[4]), 0.6)
            if cells[6] != "n/a":
                check(
                    f"{what}: XLA peak donate / no donate",
                    float(cells[6]),
                    0.6,
                )
    if not out:
        return []
    return ["| target | measured | goal | |", "|---|---:|---:|---|", *out]


def unroll_summary(groups: dict) -> list[str]:
    lines = []
    for (devices, group), runs in sorted(groups.items()):
        if not group.startswith("dncnn-k10-"):
            continue
        times = {
            label.split("=")[1]: per_step(b, STAT)
            for label, (b, _, _) in latest(runs).items()
            if label.startswith("library-unroll=")
        }
        if times:
            best = min(times, key=times.get)
            cells = ", ".join(f"unroll={u}: {fmt_time(v)}" for u, v in times.items())
            lines.append(
                f"- {group.split('-')[-1]}, {devices} devices: {cells} per step; "
                f"fastest: unroll={best}"
            )
    return lines


def machine(records: list[dict]) -> list[str]:
    info = records[0]["_machine"] if records else {}
    cpu = info.get("cpu", {})
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    flags = sorted(
        {
            f"`{b['extra_info']['xla_flags']}`"
            for b in records
            if "xla_flags" in b["extra_info"]
        }
    )
    flags = "; ".join(flags) or "unknown"
    loads = [
        b["extra_info"]["load_avg"] for b in records if "load_avg" in b["extra_info"]
    ]
    load = f"{min(loads):.2f} to {max(loads):.2f}" if loads else "unknown"
    when = records[-1]["_when"] if records else datetime.datetime.now().isoformat()
    versions = ", ".join(
        f"{p} {version(p)}" for p in ("jax", "jaxlib", "equinox", "optax")
    )
    return [
        f"- CPU: {cpu.get('brand_raw', platform.processor() or 'unknown')}, "
        f"{os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {versions}",
        f"- XLA_FLAGS of the runs: {flags}",
        f"- 1-minute load average during the cases: {load}",
        f"- date: {when}",
    ]


def report(records: list[dict], tolerance: float, command: str) -> str:
    groups = step_groups(records)
    parts = [
        f"Command: `{command}`",
        "",
        *machine(records),
        "",
        f"Time per step ({STAT} over rounds); ratio = library / baseline, "
        "lower is better. A baseline does the same math by hand (raw `jax.pmap`, "
        "raw `jax.jit` over `jax.shard_map`, raw `jax.jit`) and is timed in rounds "
        "interleaved with the library's (one baseline round before each library "
        "round), so both see the same machine; `stable`: two runs agreed on all "
        f"the ratios of the group within {tolerance:.0%} (`once`: a slow sweep "
        "setting, one round). First call = trace + compile + one run. Peak RSS = "
        "rise of the process's peak resident memory over building the case and "
        "its first call (compilation included).",
        "",
        *steps_table(groups, tolerance),
    ]
    mem = memory_table(records)
    if mem:
        parts += [
            "",
            "Memory, Adam on a ~50M-parameter MLP, a fresh process each: peak "
            "RSS above the process after importing JAX, over the steps after the "
            "first (the heap trimmed with `malloc_trim` before each reading); "
            "XLA's own figure for the compiled step (arguments + outputs - "
            "donated + temporaries, per device). `library-split`: the library "
            "with `XLA_FLAGS=--xla_disable_hlo_passes=cpu-all-reduce-combiner` "
            "(one all-reduce per gradient leaf).",
            "",
            *mem,
        ]
    loop = loop_table(records)
    if loop:
        parts += [
            "",
            "The whole loop: `BasicTrainer.train()` (one epoch, its iterator, hooks, "
            "one evaluation batch, the non-finite check) against a bare loop of the "
            "same parallel step on batches placed beforehand; time per step, "
            "interleaved rounds. `command`: `eqx-steps train` (DnCNN, its log, "
            "~15 evaluations of the test set, a checkpoint per epoch), timed from "
            "its second record to its last in `metrics.jsonl`.",
            "",
            *loop,
        ]
    unroll = unroll_summary(groups)
    if unroll:
        parts += [
            "",
            "DnCNN, `steps_per_call=10`, time per step by `unroll`:",
            "",
            *unroll,
        ]
    tg = targets(groups, records)
    if tg:
        parts += ["", "Targets:", "", *tg]
    return "\n".join(parts) + "\n"


def update_doc(path: str, text: str) -> None:
    with open(path) as f:
        doc = f.read()
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------


STAT = "min"


def main(argv=None) -> None:
    global STAT
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--devices", default="1,4", help="device counts (default 1,4)")
    p.add_argument("--max-runs", type=int, default=3, help="runs per group at most")
    p.add_argument("--tolerance", type=float, default=0.03)
    p.add_argument("--stat", default="min", choices=("min", "median", "mean"))
    p.add_argument("--out-dir", default=os.path.join(ROOT, ".benchmarks", "report"))
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="report these runs")
    p.add_argument("--update-doc", metavar="MD", help="replace the report block in MD")
    p.add_argument(
        "--chart",
        metavar="PNG",
        help="write the ratios as a bar chart (default with --update-doc: "
        "benchmark-ratios.png beside MD)",
    )
    p.add_argument("-k", dest="keyword", help="pytest -k expression (a subset)")
    p.add_argument(
        "--no-memory", action="store_true", help="leave out the memory benchmark"
    )
    p.add_argument(
        "--scaling-plot", metavar="PNG", help="plot test_scaling.py's records here"
    )
    args = p.parse_args(argv)
    STAT = args.stat
    command = "python benchmarks/report.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:])
    )

    if args.from_json:
        records = load(args.from_json)
    else:
        os.makedirs(args.out_dir, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        paths = []
        extra = ["-k", args.keyword] if args.keyword else []
        for n in [int(d) for d in args.devices.split(",")]:
            select = [
                "benchmarks/test_steps.py",
                "benchmarks/test_loop.py",
                "benchmarks/test_command.py",
            ]
            if not args.no_memory:
                select.append("benchmarks/test_memory.py")
            for run in range(args.max_runs):
                path = os.path.join(args.out_dir, f"{stamp}-d{n}-run{run}.json")
                run_suite(n, path, select, extra if run == 0 else [])
                paths.append(path)
                groups = step_groups(load(paths))
                todo = [
                    b["fullname"]
                    for (devices, _), runs in groups.items()
                    if devices == n and not stable(runs, args.tolerance)
                    for b in runs[0].values()
                    if b["extra_info"]["role"] != "sweep"
                ]
                if not todo:
                    break
                print(
                    f"{len(todo)} benchmarks not yet stable on {n} devices",
                    file=sys.stderr,
                )
                select = todo
        records = load(paths)
    text = report(records, args.tolerance, command)
    if args.scaling_plot:
        text += "\n" + "\n".join(scaling_plot(records, args.scaling_plot)) + "\n"
    print(text)
    if args.update_doc:
        update_doc(args.update_doc, text)
    chart = args.chart or (
        args.update_doc
        and os.path.join(os.path.dirname(args.update_doc), "benchmark-ratios.png")
    )
    if chart:
        ratio_chart(step_groups(records), chart)


if __name__ == "__main__":
    main()

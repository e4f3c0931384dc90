"""Peak memory of `eqx-steps train --data FOLDER` on a folder of several GB.

Generates a folder of large image files (random pixels, stored without
compression, so the files are as large as the pixels: `--gb` GB in all, as
uncompressed TIFF, which is quick to write; kept for the next run, never
committed), then runs a short training on it in a
subprocess and samples the resident set size (RSS) of the command's process and
of its Grain worker processes every 20 ms.

    python benchmarks/stream_memory.py --folder /tmp/eqx_stream_2gb --gb 2.1

The issue's bound: the training process's peak RSS under 1.5 GB for a folder of
at least 2 GB. Holding the folder in memory as float32, as `--data` did before,
would take 4x the pixels' bytes (8 GB for 2 GB of 8-bit pixels).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_folder(folder: str, gb: float, height: int = 1536, width: int = 2048) -> int:
    """Fill `folder` with uncompressed RGB TIFF files of `height` x `width`
    random pixels until it holds `gb` GB; the bytes it holds."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    total = sum(e.stat().st_size for e in os.scandir(folder))
    i = len(os.listdir(folder))
    while total < gb * 1e9:
        path = os.path.join(folder, f"im{i:05d}.tif")
        pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
        Image.fromarray(pixels).save(path)
        total += os.path.getsize(path)
        i += 1
    return total


def peak_rss(argv: list[str]) -> tuple[int, float, float, float]:
    """Run `argv`; its exit status, seconds, and the peak RSS (MB) of its own
    process and of its child processes together."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    main_peak = children_peak = 0.0
    while proc.poll() is None:
        try:
            main_peak = max(main_peak, ps.memory_info().rss / 2**20)
            kids = 0.0
            for child in ps.children(recursive=True):
                with_child = child.memory_info().rss / 2**20
                kids += with_child
            children_peak = max(children_peak, kids)
        except psutil.Error:
            pass
        time.sleep(0.02)
    return proc.returncode, time.perf_counter() - start, main_peak, children_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(),
                                                         "eqx_stream_2gb"))  # fmt: skip
    parser.add_argument("--gb", type=float, default=2.1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=512)
    args = parser.parse_args()
    total = make_folder(args.folder, args.gb)
    files = len(os.listdir(args.folder))
    print(f"folder {args.folder}: {files} image files, {total / 1e9:.2f} GB")
    with tempfile.TemporaryDirectory() as out:
        argv = [
            sys.executable, "-m", "eqx_steps", "train", "--data", args.folder,
            "--patch", "64", "--train-size", str(args.train_size),
            "--test-size", "64", "--batch-size", "16", "--epochs", "2",
            "--depth", "4", "--filters", "16", "--workers", str(args.workers),
            "--augment", "--out", os.path.join(out, "run"),
        ]  # fmt: skip
        code, seconds, main_mb, workers_mb = peak_rss(argv)
    print(
        f"eqx-steps train --data ({args.workers} worker(s), "
        f"{args.train_size} patches of 64x64 per epoch, 2 epochs): exit {code}, "
        f"{seconds:.0f} s; peak RSS {main_mb:.0f} MB (training process), "
        f"{workers_mb:.0f} MB (its Grain workers together); the pixels as float32 "
        f"would be {4 * total / 2**20:.0f} MB"
    )


if __name__ == "__main__":
    main()

"""Training from a streamed folder of PNG files vs from arrays in memory (issue
22: the input pipeline never limits the step; target: <= 1.05x).

Both cases run the same compiled training step of a `BasicTrainer` (DnCNN on
64x64 colour patches, batch 16): one draws its batches from
`eqx_steps.pipeline.image_folder_dataset` (PNG files decoded by Grain in
`WORKERS` worker processes, patches cut, turned and flipped, noise added, then
split over the devices by the trainer), the other from the same number of
patches held in memory (`create_input_iter`, the trainer's default). The
in-memory case is the baseline, timed in rounds interleaved with the streamed
one's (`extra_info["partner_times"]`), so both see the same load; the ratio is
of the medians.

    pytest benchmarks/test_stream.py --benchmark-only -s

`EQX_STREAM_WORKERS` sets the worker count (default: the CPU cores minus one,
at least 1). Measured on a 2-core machine shared with other jobs, 4 CPU
devices, DnCNN depth 4 with 32 filters: 0.991x with 1 worker (816 ms vs 824 ms
per step, load 18.3), 1.038x with 0 workers (decoding in threads of the
training process; 740 ms vs 713 ms, load 16.9).
"""

from __future__ import annotations

import os
import time

import equinox as eqx
import jax
import numpy as np
from PIL import Image

import eqx_steps as es


WORKERS = int(os.environ.get("EQX_STREAM_WORKERS", max(1, (os.cpu_count() or 2) - 1)))
STEPS, ROUNDS, WARMUP = 20, 7, 1
IMAGES, SIZE, PATCH, BATCH = 24, 512, 64, 16
DEPTH, FILTERS = 4, 32
PER_EPOCH = 1024  # patches: ~50 per image and epoch


def _folder(path, n: int, size: int) -> str:
    """`n` RGB PNG files of `size` x `size`: smooth shapes under pixel noise (a
    file of ~0.5 MB per 512x512 image, slower to decode than a photograph)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        f = rng.uniform(1, 6, 3)
        smooth = 0.5 + 0.4 * np.sin(2 * np.pi * (f[:, None, None] * (xx + yy * i / n)))
        noisy = smooth.transpose(1, 2, 0) + rng.normal(0, 0.05, (size, size, 3))
        pixels = (np.clip(noisy, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(path, f"im{i:03d}.png"))
    return str(path)


def _trainers(folder: str, quick: bool):
    depth, filters = (2, 4) if quick else (DEPTH, FILTERS)
    model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
        depth=depth, channels=3, num_filters=filters, key=jax.random.key(0)
    )
    config = {"batch_size": BATCH, "num_epochs": 1, "seed": 0}
    stream = es.pipeline.image_folder_dataset(
        folder,
        patch_size=PATCH,
        batch_size=BATCH,
        patches_per_epoch=PER_EPOCH,
        augment=True,
        noise_std=0.1,
        workers=0 if quick else WORKERS,
    )
    images = [im for _, im in es.images.read_images(folder)]
    clean = es.images.random_patches(images, PER_EPOCH, size=PATCH, seed=0)
    z = np.random.default_rng(1).standard_normal(clean.shape, np.float32)
    arrays = {"image": clean + np.float32(0.1) * z, "label": clean}
    streamed = es.BasicTrainer(config, model, stream, model_state=model_state)
    in_memory = es.BasicTrainer(config, model, arrays, model_state=model_state)
    return streamed, in_memory


def _runner(trainer):
    """`run(n)`: `n` training steps on the trainer's batches."""
    batches, step = trainer.train_dt_iter, trainer.p_train_step
    holder = [trainer.state]

    def run(n: int) -> None:
        state = holder[0]
        for _ in range(n):
            state, metrics = step(state, next(batches))
        holder[0] = state
        jax.block_until_ready((state, metrics))

    return run


def test_stream_vs_in_memory(benchmark, quick: bool, tmp_path):
    folder = _folder(tmp_path, 4 if quick else IMAGES, 128 if quick else SIZE)
    streamed, in_memory = _trainers(folder, quick)
    run, baseline = _runner(streamed), _runner(in_memory)
    run(2)  # compile, start the workers, fill the pipeline
    baseline(2)
    steps, rounds, warmup = (2, 1, 0) if quick else (STEPS, ROUNDS, WARMUP)
    times: list[float] = []

    def setup():
        t0 = time.perf_counter()
        baseline(steps)
        times.append(time.perf_counter() - t0)

    benchmark.group = "stream-vs-memory"
    benchmark.extra_info.update(
        workers=WORKERS,
        devices=jax.device_count(),
        steps_per_round=steps,
        load_avg_start=os.getloadavg()[0],
        partner="the same trainer's step on patches in memory",
        partner_times=times,
    )
    benchmark.pedantic(run, args=(steps,), setup=setup, rounds=rounds,
                       warmup_rounds=warmup)  # fmt: skip
    if not quick and benchmark.stats is not None:
        mine = np.median(benchmark.stats.stats.data)
        base = np.median(times[warmup:])
        ratio = float(mine / base)
        benchmark.extra_info["ratio_to_in_memory"] = ratio
        load = os.getloadavg()
        benchmark.extra_info["load_avg_end"] = load[0]
        print(
            f"\nstreamed ({WORKERS} worker(s)) / in memory: {ratio:.3f}x per step "
            f"({1e3 * mine / steps:.0f} ms vs {1e3 * base / steps:.0f} ms; load "
            f"{load[0]:.1f})"
        )

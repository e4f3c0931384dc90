"""SCICO's pretrained DnCNN denoisers side by side with `load_scico_dncnn`.

SCICO is never a dependency of this project: give this script the Python of a
scratch environment that has it, e.g.

    python3 -m venv /tmp/scico_venv
    /tmp/scico_venv/bin/pip install "scico==0.0.7" "jax==0.8.1" "jaxlib==0.8.1" flax
    python benchmarks/scico_dncnn_compare.py --scico-python /tmp/scico_venv/bin/python

For each variant, a grayscale crop of `--image` (the mean of its RGB channels)
gets white Gaussian noise of std `--sigma` (seeded, `eqx_steps.denoise.add_noise`);
SCICO's `scico.denoiser.DnCNN(variant)` (with `sigma` for the noise-level
variants, as SCICO passes it) denoises it in a child process of the scratch
environment, and `eqx_steps.denoise.denoise_image` with
`eqx_steps.models.load_scico_dncnn(variant)` here, untiled and in 64-pixel tiles.
The variants SCICO has but this package does not ship (17L, 17H, 17N) are loaded
by path from SCICO's installed files. Prints, per variant, the largest relative
difference `max |ours - scico| / max |scico|` and the SNRs (noisy vs clean,
denoised vs clean), and a Markdown table.

It also runs both on `reference_input()`, a small deterministic image, and prints
the figures that `tests/test_scico_weights.py` holds (`--print-reference`), and
measures the effect of SCICO's colour handling (it denoises each channel of the
transposed image) on a colour crop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


SHIPPED = ("6L", "6M", "6H", "6N", "17M")
NOT_SHIPPED = ("17L", "17H", "17N")
REFERENCE_PIXELS = ((0, 0), (5, 7), (16, 3), (31, 31))


def reference_input():
    """A deterministic 32x32 image in [0, 1] (integer arithmetic only, so it is
    bit-identical everywhere); the same formula is in tests/test_scico_weights.py."""
    import numpy as np

    i, j = np.mgrid[:32, :32]
    clean = ((i * 3 + j * 5) % 64) / 64 * 0.6 + 0.2
    noise = ((i * i * 31 + j * 17 + i * j * 7) % 97) / 97 - 0.5
    return (clean + 0.2 * noise).astype(np.float32)


def is_noise_level(variant: str) -> bool:
    return variant.endswith("N")


def child_scico(inputs: str, outputs: str, sigma: float) -> None:
    """In the scratch environment: SCICO's outputs for every variant."""
    import numpy as np
    import scico
    from scico.data import _flax_data_path
    from scico.denoiser import DnCNN

    x = dict(np.load(inputs, allow_pickle=False))
    out = {}
    for variant in SHIPPED + NOT_SHIPPED:
        denoiser = DnCNN(variant)
        level = sigma if is_noise_level(variant) else None
        for name in ("gray", "reference"):
            out[f"{variant}/{name}"] = np.asarray(denoiser(x[name], level))
        if variant == "6M":
            out["6M/colour"] = np.asarray(denoiser(x["colour"]))
    np.savez(outputs, **out)
    info = {"scico": scico.__version__, "data": os.path.dirname(_flax_data_path(""))}
    print(json.dumps(info))


def _scico_kodim23(python: str) -> str:
    code = "import os, scico.data as d; print(os.path.dirname(d.__file__))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"Cannot import scico with {python}:\n{done.stderr}")
    return os.path.join(done.stdout.strip(), "examples", "kodim23.png")


def rel_diff(ours, theirs) -> float:
    import numpy as np

    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scico-python", required=True)
    parser.add_argument(
        "--image", help="a PNG photograph (default: kodim23.png of SCICO's install)"
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-reference", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_scico(*args.child, args.sigma)

    from eqx_steps.cli import configure_xla_flags

    configure_xla_flags()
    import matplotlib.image
    import numpy as np

    import eqx_steps as es
    from eqx_steps.denoise import add_noise, denoise_image
    from eqx_steps.models import load_scico_dncnn

    image = args.image or _scico_kodim23(args.scico_python)
    rgb = matplotlib.image.imread(image)[..., :3].astype(np.float32)
    top, left = (np.array(rgb.shape[:2]) - args.size) // 2
    crop = rgb[top : top + args.size, left : left + args.size]
    clean = crop.mean(-1)
    gray = add_noise(clean, args.sigma, args.seed)
    colour = add_noise(crop[:128, :128], args.sigma, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(inputs, gray=gray, reference=reference_input(), colour=colour)
        child = [args.scico_python, __file__, "--child", inputs, outputs]
        child += ["--sigma", str(args.sigma), "--scico-python", args.scico_python]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"SCICO's side failed:\n{done.stderr}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        scico = dict(np.load(outputs, allow_pickle=False))

    rows, reference = [], {}
    for variant in SHIPPED + NOT_SHIPPED:
        source = (
            variant
            if variant in SHIPPED
            else os.path.join(info["data"], f"dncnn{variant}.mpk")
        )
        model, state = load_scico_dncnn(source)
        level = args.sigma if is_noise_level(variant) else None
        ours = denoise_image(model, state, gray, sigma=level)
        tiled = denoise_image(model, state, gray, sigma=level, tile=64)
        small = denoise_image(model, state, reference_input(), sigma=level)
        theirs = scico[f"{variant}/gray"]
        row = {
            "variant": variant,
            "shipped": variant in SHIPPED,
            "max_rel_diff": rel_diff(ours, theirs),
            "max_rel_diff_tiled": rel_diff(tiled, theirs),
            "max_rel_diff_reference": rel_diff(small, scico[f"{variant}/reference"]),
            "snr_noisy_db": float(es.snr(clean, gray)),
            "snr_ours_db": float(es.snr(clean, ours)),
            "snr_scico_db": float(es.snr(clean, theirs)),
        }
        rows.append(row)
        print(json.dumps(row))
        if variant in SHIPPED:
            theirs_small = scico[f"{variant}/reference"].astype(np.float64)
            reference[variant] = {
                "sum": float(theirs_small.sum()),
                "sum_sq": float((theirs_small**2).sum()),
                "pixels": [float(theirs_small[p]) for p in REFERENCE_PIXELS],
            }

    model, state = load_scico_dncnn("6M")
    ours = denoise_image(model, state, colour)
    clean_colour = crop[:128, :128]
    print(
        json.dumps(
            {
                "colour_6M_snr_noisy_db": float(es.snr(clean_colour, colour)),
                "colour_6M_snr_ours_db": float(es.snr(clean_colour, ours)),
                "colour_6M_snr_scico_db": float(
                    es.snr(clean_colour, scico["6M/colour"])
                ),
                "colour_6M_rel_diff": rel_diff(ours, scico["6M/colour"]),
            }
        )
    )
    print(
        f"\nSCICO {info['scico']}; {args.size}x{args.size} gray crop of "
        f"{os.path.basename(image)}, sigma {args.sigma}, seed {args.seed}\n"
    )
    print(
        "| variant | max rel. diff (untiled / 64-px tiles) | SNR noisy | "
        "SNR ours | SNR SCICO |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        name = r["variant"] + ("" if r["shipped"] else " (by path)")
        print(
            f"| {name} | {r['max_rel_diff']:.1e} / {r['max_rel_diff_tiled']:.1e} | "
            f"{r['snr_noisy_db']:.2f} dB | {r['snr_ours_db']:.2f} dB | "
            f"{r['snr_scico_db']:.2f} dB |"
        )
    if args.print_reference:
        print("\nREFERENCE =", json.dumps(reference, indent=4))


if __name__ == "__main__":
    main()

"""Train a DnCNN denoiser with `BasicTrainer`, then denoise a photograph with it and
with SCICO's pretrained DnCNN "6M".

The denoiser trains on synthetic phantoms (random ellipses, made on the fly, no
download) with Gaussian noise of standard deviation 0.1; the photograph gets noise
of the same level, and both denoisers clean it channel by channel. The script
prints the SNR and PSNR of the noisy and of both denoised photographs, and writes a
picture of the four side by side.

Run with `python examples/train_denoiser.py [PHOTO] [--epochs N] [--picture FILE]`,
e.g. on Kodak's `kodim23.png`; without PHOTO it uses the 192x192 window of
`kodim23` shipped in `examples/data/kodim23-crop.png` (the macaw's head). This is
the code of the tutorial "Train a denoiser, denoise a photograph";
`tests/test_docs.py` runs it with tiny settings.
"""

import argparse
import pathlib

import equinox as eqx
import jax
import numpy as np

import eqx_steps as es


# --8<-- [start:train]
def train_denoiser(
    *,
    epochs: int = 3,
    n_train: int = 1024,
    n_test: int = 128,
    patch: int = 32,
    noise: float = 0.1,
    depth: int = 6,
    filters: int = 32,
    batch_size: int = 16,
    seed: int = 0,
):
    """Train a DnCNN on noisy synthetic patches; the model, its state, the history."""
    train_ds, test_ds = es.synthetic.make_denoising_data(
        n_train, n_test, size=patch, noise_std=noise, seed=seed
    )
    model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
        depth=depth, channels=1, num_filters=filters, key=jax.random.key(seed)
    )
    config = es.TrainConfig(
        seed=seed,
        batch_size=batch_size,  # the global batch, split across the devices
        num_epochs=epochs,
        base_learning_rate=3e-3,
        lr_schedule=es.create_cnst_lr_schedule,
        return_state=False,  # train() returns (model, model_state), as SCICO's
    )
    trainer = es.BasicTrainer(config, model, train_ds, test_ds, model_state=model_state)
    (model, model_state), history = trainer.train()
    return model, model_state, history


# --8<-- [end:train]


# --8<-- [start:photo]
def denoise_photograph(path, model, model_state, *, sigma: float = 0.1, seed=0):
    """Add noise of std `sigma` to the photograph at `path` and denoise it with the
    given model and with SCICO's pretrained DnCNN "6M"; the four images by name."""
    clean = es.images.read_image(path)  # (H, W, 3) float32 in [0, 1]
    noisy = es.denoise.add_noise(clean, sigma, seed=seed)
    scico_model, scico_state = es.models.load_scico_dncnn("6M")
    return {
        "clean": clean,
        "noisy": noisy,
        # One-channel models denoise a colour image channel by channel.
        "trained here": es.denoise.denoise_image(model, model_state, noisy),
        "SCICO 6M": es.denoise.denoise_image(scico_model, scico_state, noisy),
    }


def report(images: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Print and return the SNR and PSNR (dB, peak 1) of each image against the
    clean one."""
    clean = images["clean"]
    figures = {}
    print(f"{'':>14}  SNR (dB)  PSNR (dB)")
    for name, image in images.items():
        if name != "clean":
            snr, psnr = float(es.snr(clean, image)), float(es.psnr(clean, image))
            figures[name] = (snr, psnr)
            print(f"{name:>14}  {snr:8.2f}  {psnr:9.2f}")
    return figures


# --8<-- [end:photo]


def save_picture(
    images: dict[str, np.ndarray],
    figures: dict[str, tuple[float, float]],
    path,
    top: int = 170,
    left: int = 70,
    size: int = 192,
    sigma: float = 0.1,
) -> None:
    """A `size` x `size` window of the images (at `top`, `left`: kodim23's
    macaw head; moved and shrunk to fit a smaller image), side by side, each
    titled with its name and SNR (`figures`, from `report`), as a PNG."""
    from matplotlib.figure import Figure

    height, width = images["clean"].shape[:2]
    size = min(size, height, width)
    top, left = min(top, height - size), min(left, width - size)
    window = (slice(top, top + size), slice(left, left + size))
    names = {
        "noisy": f"noisy (std {sigma:g})",
        "trained here": "DnCNN trained here",
        "SCICO 6M": "SCICO's DnCNN 6M",
    }
    fig = Figure(figsize=(2.4 * len(images), 2.9), dpi=100, layout="constrained")
    for ax, (name, image) in zip(fig.subplots(1, len(images)), images.items()):
        tile = np.clip(image[window], 0, 1)
        ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray")
        title = names.get(name, name)
        if name in figures:
            title += f"\nSNR {figures[name][0]:.2f} dB"
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    fig.savefig(path, format="png")


def main(argv=None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "photo",
        type=pathlib.Path,
        nargs="?",
        default=pathlib.Path(__file__).parent / "data" / "kodim23-crop.png",
        help="an image file, e.g. kodim23.png (default: the crop in examples/data/)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--test-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--picture", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    model, model_state, history = train_denoiser(
        epochs=args.epochs,
        n_train=args.train_size,
        n_test=args.test_size,
        depth=args.depth,
        filters=args.filters,
    )
    print("last record:", history.records[-1])
    images = denoise_photograph(args.photo, model, model_state)
    figures = report(images)
    if args.picture is not None:
        save_picture(images, figures, args.picture)
    return figures


if __name__ == "__main__":
    # Without an accelerator, split the CPU into devices before JAX starts.
    es.platform.configure_xla_flags(es.platform.default_cpu_devices())
    main()

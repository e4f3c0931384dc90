"""Training of DnCNN for denoising: SCICO's example script ported to eqx_steps.

SCICO's `examples/scripts/denoise_dncnn_train_bsds.py`, step by step, with the
Equinox model and `eqx_steps` in place of `scico.flax`: the same configuration
dict, `BasicTrainer` for `BasicFlaxTrainer`, `train()`, the trained model applied
to the test set (`only_apply`, which restores the checkpoint as SCICO's does),
and the SNR printout. Each change from SCICO's script is marked `# SCICO:`.

The data are synthetic phantoms made on the fly (SCICO's script reads BSDS
patches), and the sizes are tiny so that it runs in seconds on a CPU; raise them
(`main(size=40, train_nimg=400 * 60, num_epochs=50, depth=6, num_filters=64)`)
for SCICO's settings. Run with `python examples/scico_port.py`.
"""

import os


# Set an arbitrary processor count (only applies if GPU is not available).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import tempfile  # noqa: E402
from time import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import eqx_steps as es  # noqa: E402
from eqx_steps.synthetic import make_denoising_data  # noqa: E402


def main(
    *,
    size: int = 16,
    train_nimg: int = 256,
    test_nimg: int = 36,
    num_epochs: int = 10,
    depth: int = 4,
    num_filters: int = 16,
    workdir: str | None = None,
    verbose: bool = True,
) -> dict:
    """Train, apply and score the DnCNN; the figures the script prints.

    **Arguments:**

    - `size`, `train_nimg`, `test_nimg`: patch size and numbers of patches.
    - `num_epochs`, `depth`, `num_filters`: training length and model size.
    - `workdir`: the checkpoint folder (default: a new temporary folder).
    - `verbose`: SCICO's `log` (parameter overview, progress, metrics).

    **Returns:**

    A dict with the trained `state`, the `history`, the test `output`, and the
    test SNRs `snr_noisy`, `snr_eval` and `psnr_eval` (dB).
    """
    print("Platform: ", jax.default_backend())

    # Read data. SCICO: load_image_data(train_nimg, test_nimg, size, gray, "dn",
    # noise_level=0.1, ...) on BSDS images.
    noise_level = 0.1  # Standard deviation of noise
    train_ds, test_ds = make_denoising_data(
        train_nimg, test_nimg, size=size, noise_std=noise_level, seed=0
    )

    # Configuration dictionary for the model and the training loop.
    model_conf = {"depth": depth, "num_filters": num_filters}
    train_conf: es.ConfigDict = {
        "seed": 0,
        "opt_type": "ADAM",
        "batch_size": 16,  # SCICO: 128
        "num_epochs": num_epochs,
        "base_learning_rate": 1e-2,  # SCICO: 1e-3 (a much longer run)
        "warmup_epochs": 0,
        "log_every_steps": max(1, train_nimg // 16),  # each epoch; SCICO: 5000
        "log": verbose,
        "checkpointing": True,
    }

    # Construct the DnCNN model. SCICO: sflax.DnCNNNet(depth=..., channels=...,
    # num_filters=...), initialised by the trainer; an Equinox model arrives
    # initialised, with its BatchNorm statistics in `model_state`.
    channels = train_ds["image"].shape[-1]
    model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
        depth=model_conf["depth"],
        channels=channels,
        num_filters=model_conf["num_filters"],
        key=jax.random.key(train_conf["seed"]),
    )

    # Run the training loop. SCICO: ~/.cache/scico/examples/dncnn_out, where a
    # second run restores the last checkpoint instead of training again.
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="scico_port-")
    train_conf["workdir"] = workdir
    print(f"\nJAX local devices: {jax.local_devices()}\n")

    trainer = es.BasicTrainer(
        train_conf, model, train_ds, test_ds, model_state=model_state
    )
    start_time = time()
    # SCICO: modvar, stats_object = trainer.train() (variables dict, IterationStats);
    # with train_conf["return_state"] = False: (model, model_state), history.
    state, history = trainer.train()
    train_time = time() - start_time  # SCICO: trainer.train_time

    # Evaluate on testing data. SCICO: FlaxMap(model, modvar)(test_ds["image"]).
    # only_apply follows SCICO's rule: with "checkpointing" it restores the latest
    # checkpoint of "workdir" (use_checkpoint=False applies the weights given);
    # it returns SCICO's (output, variables), here (output, (model, model_state)),
    # and keeps the last partial batch (36 patches, batch 16: 36 outputs).
    start_time = time()
    output, _ = es.only_apply(train_conf, model, test_ds, model_state=model_state)
    time_eval = time() - start_time
    output = np.clip(output, a_min=0, a_max=1.0)

    # Evaluate the trained model in terms of reconstruction time and fidelity.
    snr_noisy = float(es.snr(test_ds["label"], test_ds["image"]))
    snr_eval = float(es.snr(test_ds["label"], output))
    psnr_eval = float(es.psnr(test_ds["label"], output))
    print(
        f"{'DnCNNNet training':18s}{'epochs:':2s}{train_conf['num_epochs']:>5d}"
        f"{'':21s}{'time[s]:':10s}{train_time:>7.2f}"
    )
    print(
        f"{'DnCNNNet testing':18s}{'SNR:':5s}{snr_eval:>5.2f}{' dB'}{'':3s}"
        f"{'PSNR:':6s}{psnr_eval:>5.2f}{' dB'}{'':3s}{'time[s]:':10s}{time_eval:>7.2f}"
    )
    print(f"{'Noisy input':18s}{'SNR:':5s}{snr_noisy:>5.2f}{' dB'}")

    # Convergence statistics, only when a training cycle was done (a rerun in the
    # same workdir restores the final checkpoint and trains no further). SCICO:
    # stats_object.history(transpose=True); the same field names.
    if history.records:
        hist = history.history(transpose=True)
        print(
            "Eval SNR by epoch: "
            + ", ".join(f"{e}: {s:.2f} dB" for e, s in zip(hist.Epoch, hist.Eval_SNR))
        )
    return {
        "state": state,
        "history": history,
        "output": output,
        "snr_noisy": snr_noisy,
        "snr_eval": snr_eval,
        "psnr_eval": psnr_eval,
    }


if __name__ == "__main__":
    main()

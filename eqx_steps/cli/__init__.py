"""The `eqx-steps` command: train an image denoiser, evaluate it, inspect a run.

    eqx-steps train                      # DnCNN on synthetic patches, all local devices
    eqx-steps train --data photos/ --epochs 5 --out runs/mine   # your own images
    eqx-steps train --out runs/mine --resume --epochs 8
    eqx-steps evaluate runs/mine
    eqx-steps info runs/mine
    eqx-steps denoise photo.png --variant 6M --noise 0.1   # SCICO's pretrained DnCNN
    eqx-steps train --task deblur --model modl --out runs/deblur   # deblurring, CT
    eqx-steps restore photo.png --run runs/deblur --simulate

`python -m eqx_steps` is the same command. Nothing is downloaded: the default
data are synthetic phantoms (a deterministic function of the settings), and
`--data PATH` trains on a folder of images, one image or an array. `evaluate`
rebuilds the exact test set from the run's `config.json`.

`train` builds the model and a [`eqx_steps.BasicTrainer`][] (progress bar,
`metrics.jsonl` and orbax checkpoints in the run folder) and then writes
`curves.png` and `samples.png` and prints the test SNR/PSNR of the noisy input
and of the output. Every setting can also come from a TOML or JSON file
(`--config`); command-line options override it.

Devices: the run uses every local device. Without an accelerator, the host CPU
is split into `--devices N` XLA devices (default `min(4, os.cpu_count())`), so the
data-parallel path is the one exercised even on a laptop; XLA reads that setting
when its backend starts, so the command sets it before anything touches JAX
([`eqx_steps.platform.configure_xla_flags`][]).

One module per concern: `_settings` (the settings table), `_config_file` (`--config`
files), `_main` (the parser and the entry point), `_run_folder` (the one writer of
`config.json` and the pictures), `_data`, `_models`, `_report` (the final table),
`_runtime` (devices, multi-process start-up), `_tasks` (the deblur and ct tasks:
operator, network), `_task_data` (their measurements) and one module per command
(`train`, `evaluate`, `info`, `restore`, `denoise`), each with `add_parser` and `run`.
The public module `eqx_steps.cli.runs` gives the pieces the commands build (settings,
data, operator, restored state) to scripts and tests.
"""

from ._main import build_parser as build_parser, main as main

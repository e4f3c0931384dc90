"""`eqx-steps evaluate RUN_DIR`: the test metrics of a run's latest checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from ._data import load_data
from ._errors import UsageError
from ._models import build_model, restore
from ._report import eval_batch_size, report
from ._runtime import start_jax
from ._settings import BY_NAME
from ._tasks import describe
from .runs import run_settings
from .train import trainer_config


def add_parser(commands: Any, formatter: Any) -> None:
    """Add the `evaluate` command to the subparsers `commands`."""
    parser = commands.add_parser(
        "evaluate",
        help="test metrics of a run's latest checkpoint",
        description="Restore the latest checkpoint of RUN_DIR (the model rebuilt "
        "from its config.json), rebuild the same test set and print the test SNR "
        "(SCICO's evaluation, the eval_snr of the training log), PSNR and MSE of "
        "the noisy input and of the output, and the mean of per-patch SNRs.",
        formatter_class=formatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    BY_NAME["devices"].add_to(parser)
    BY_NAME["batch_size"].add_to(
        parser,
        text="evaluation batch size, rounded up to a multiple of the device count "
        "(default: the run's)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run `eqx-steps evaluate` with the parsed `args`; the exit status."""
    settings = run_settings(args.run_dir)
    start_jax(args.devices, None)
    batch_size = eval_batch_size(args.batch_size or settings["batch_size"])
    data = load_data(settings, train=False)
    model, model_state = build_model(settings, data.channels)
    state = restore(
        trainer_config(settings, args.run_dir), model, model_state, args.run_dir
    )
    if state is None:
        raise UsageError(
            f"run folder {args.run_dir!r} holds no checkpoint; train it with "
            f"`eqx-steps train --out {args.run_dir} --resume`"
        )
    step = int(state.step)
    text, _, _ = report(
        settings,
        data.test,
        state.model,
        state.model_state,
        batch_size,
        settings["backend"] or "pmap",
        step,
    )
    task = "" if settings["task"] == "denoise" else f" ({describe(settings)})"
    print(f"{args.run_dir}: {settings['model']}{task}, checkpoint step {step}")
    print(text)
    return 0

"""`eqx-steps info RUN_DIR`: configuration, parameters and last metrics of a run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._validate import check_int
from . import _run_folder as folder
from ._errors import reported
from ._models import build_model, resolve, restore
from ._runtime import start_jax
from ._settings import DEFAULTS, saved_settings
from .train import trainer_config


def add_parser(commands: Any, formatter: Any) -> None:
    """Add the `info` command to the subparsers `commands`."""
    parser = commands.add_parser(
        "info",
        help="configuration, parameters and last metrics of a run",
        description="Print the configuration of RUN_DIR, the parameter overview of "
        "its latest checkpoint and its last metrics record.",
        formatter_class=formatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.set_defaults(run=run)


def _record_line(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in record.items()
    )


def run(args: argparse.Namespace) -> int:
    """Run `eqx-steps info` with the parsed `args`; the exit status."""
    config = folder.read_config(args.run_dir)
    settings = resolve({**DEFAULTS, **saved_settings(config, folder.CONFIG_FILE)})
    start_jax(None, None)
    from ..trainer import parameter_overview

    print(f"Run folder: {args.run_dir}")
    print(f"Configuration ({folder.CONFIG_FILE}):")
    width = max(map(len, config), default=0)
    for k, v in config.items():
        print(f"  {k:<{width}}  {json.dumps(v)}")
    with reported(f"{folder.CONFIG_FILE}: "):
        channels = check_int("channels", config.get("channels", 1))
    model, model_state = build_model(settings, channels)
    state = restore(
        trainer_config(settings, args.run_dir), model, model_state, args.run_dir
    )
    if state is None:
        print("No checkpoint: the parameters of the initial model.")
    else:
        model, model_state = state.model, state.model_state
        print(f"Parameters at checkpoint step {int(state.step)}:")
    print(parameter_overview(model))
    if model_state is not None:
        print("Batch-norm statistics:")
        print(parameter_overview(model_state))
    records = folder.read_metrics(args.run_dir)
    if records:
        print(f"Last metrics record ({folder.METRICS_FILE}, {len(records)} records):")
        print("  " + _record_line(records[-1]))
        last = records[-1]
        if isinstance(last.get("eval_snr"), float):
            print(
                f"Test SNR {last['eval_snr']:.2f} dB at step {last.get('step')} "
                "(eval_snr: SCICO's evaluation, as `eqx-steps evaluate` prints it)"
            )
    else:
        print(f"No metrics records ({folder.METRICS_FILE} is missing or empty).")
    return 0

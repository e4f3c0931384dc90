"""The argument parser of `eqx-steps` and its entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._io import WriteError
from . import _runtime, denoise, evaluate, info, restore, train
from ._errors import one_line, UsageError


COMMANDS = (train, evaluate, info, restore, denoise)
"""The command modules, in the order of `--help`; each has `add_parser` and `run`."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # pyright: ignore[reportIncompatibleMethodOverride]
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=30)


def build_parser(prog: str = "eqx-steps") -> argparse.ArgumentParser:
    """The argument parser of the command, with one subcommand per command module.

    **Arguments:**

    - `prog`: the command name shown in help and error messages.

    **Returns:**

    The `argparse.ArgumentParser`; a parsed namespace has `run`, the command's
    function.
    """
    parser = _Parser(
        prog=prog,
        description="Train an Equinox image denoiser (or a deblurring or CT "
        "network: --task) on synthetic data or your own images on every local "
        "device, evaluate it, inspect a run, restore an image with a run, denoise an "
        "image file (with SCICO's pretrained DnCNN or a trained run).",
        formatter_class=_formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands, _formatter)
    for name in ("train", "evaluate", "info"):  # the commands that compile steps
        commands.choices[name].add_argument(
            "--compilation-cache",
            metavar="DIR",
            help="folder of JAX's persistent compilation cache, so that a second "
            "run of the same model starts sooner, or 'off' (none at all, not "
            "even $JAX_COMPILATION_CACHE_DIR's) (default: "
            f"${_runtime.ENV_COMPILATION_CACHE}, else "
            "$XDG_CACHE_HOME/eqx_steps/jax or ~/.cache/eqx_steps/jax)",
        )
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "eqx-steps") -> int:
    """Run the `eqx-steps` command.

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`), e.g. `["train", "--epochs",
        "5"]`.
    - `prog`: the command name shown in help and error messages.

    **Returns:**

    The exit status, 0. A bad option, file or folder prints one line on stderr
    and raises `SystemExit(2)`.
    """
    args = build_parser(prog).parse_args(argv)
    _runtime.cache_option = getattr(args, "compilation_cache", None)
    try:
        return args.run(args)
    except (UsageError, WriteError) as e:  # a bad input; a file not written
        print(
            f"{prog} {args.command}: error: {one_line(e)}", file=sys.stderr, flush=True
        )
        raise SystemExit(2) from None

"""`python -m eqx_steps`: the `eqx-steps` command (see `eqx_steps.cli`)."""

from .cli import main


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m eqx_steps"))

"""What the command builds, without running it: for scripts, notebooks and tests.

Each function is the piece the commands themselves use, so what it returns is
what `eqx-steps train`, `evaluate`, `info` and `restore` see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import _settings
from ._data import Data, load_data
from ._models import build_model, resolve, restore
from ._run_folder import read_config, read_settings
from ._runtime import compilation_cache_dir as compilation_cache_dir
from ._tasks import make_operator


def train_settings(argv: Sequence[str]) -> dict[str, Any]:
    """The settings an `eqx-steps train ARGV` command line resolves to.

    Defaults and task-dependent values (e.g. SCICO's noise for `--task deblur`)
    filled in as `train` fills them; nothing is read from a run folder or a
    config file, and nothing runs.

    **Arguments:**

    - `argv`: the options after `train`, e.g. `["--task", "deblur"]`.

    **Returns:**

    The settings, a dict keyed by option name (`"task"`, `"noise"`, ...).
    """
    from ._main import build_parser

    args = build_parser().parse_args(["train", *argv])
    given = {
        k: v for k, v in vars(args).items() if k in _settings.BY_NAME and v is not None
    }
    return resolve({**_settings.DEFAULTS, **given})


def run_settings(run_dir: str) -> dict[str, Any]:
    """The settings of the run in `run_dir` (its `config.json`), resolved as
    `evaluate`, `info` and `restore` resolve them."""
    return resolve({**_settings.DEFAULTS, **read_settings(run_dir)})


def run_data(settings: Mapping[str, Any], *, train: bool = True) -> Data:
    """The data of a run with `settings`: the training set (with `train`) and the
    test set that `evaluate` rebuilds, as `train` makes them."""
    return load_data(settings, train=train)


def run_operator(settings: Mapping[str, Any], shape: tuple[int, ...]) -> Any:
    """The forward operator of a `--task deblur` or `ct` run on one image of
    `shape` (`(H, W)`, or `(H, W, C)` to blur a colour image channel by channel)."""
    return make_operator(settings, shape)


def restore_run(run_dir: str) -> Any:
    """The latest checkpoint of the run in `run_dir`, the whole `TrainState`, as
    `evaluate` restores it; `None` when the run holds no checkpoint."""
    from .train import trainer_config

    settings = run_settings(run_dir)
    channels = int(read_config(run_dir).get("channels", 1))
    model, model_state = build_model(settings, channels)
    return restore(trainer_config(settings, run_dir), model, model_state, run_dir)

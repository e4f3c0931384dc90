"""The JSON items of a checkpoint step, beside the state's arrays: the run's
configuration (`config`) and the input pipeline's state (`data`).

`checkpoint_save` writes them (`checkpoint.py`); `load_config` and
`load_data_state` read them back, through one reader that resolves the step,
restores the item and checks that it is a JSON object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp

from ._checkpoint_parts import _CONFIG, _corrupt, _DATA, _manager, _workdir, latest_step
from ._validate import check_int


def json_object(name: str, value: Any) -> dict[str, Any]:
    """`value` checked to be a JSON object (a dict that survives JSON)."""
    try:
        ok = isinstance(value, Mapping) and json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(
            f"`{name}` must be a JSON object (a dict of str keys, numbers, strings, "
            f"lists, dicts and None), got {type(value).__name__}: {value!r:.80}."
        )
    return dict(value)


def _read_item(
    workdir: str | os.PathLike,
    step: int | None,
    item: str,
    *,
    label: str,
    missing: str,
    optional: bool,
) -> dict[str, Any] | None:
    """The JSON object stored as `item` in checkpoint `step` (`None`: the latest)
    of `workdir`; `None` when `optional` and the step stores no such item.

    `label` names the item in the error of one that is not a JSON object,
    `missing` ends the `FileNotFoundError` of a missing step; a damaged item
    raises `CorruptCheckpointError`."""
    path = _workdir(workdir)
    latest = latest_step(path)
    step = latest if step is None else check_int("step", step, minimum=0)
    if step is None or not (path / str(step)).is_dir():
        what = "no complete checkpoint" if latest is None else f"no step {step}"
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} holds {what}{missing}"
        )
    if optional and not (path / str(step) / item).is_dir():
        return None
    with _manager(path, create=False) as manager:
        steps = sorted(manager.all_steps())
        try:
            args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            value = manager.restore(step, args=args)[item]
        except Exception as e:
            raise _corrupt(path, step, steps, e) from e
    if not isinstance(value, dict):
        raise _corrupt(
            path, step, steps, TypeError(f"its {label} is not a JSON object")
        )
    return value


def load_config(
    workdir: str | os.PathLike, *, step: int | None = None
) -> dict[str, Any]:
    """Read the configuration stored with a checkpoint in `workdir`.

    **Arguments:**

    - `workdir`: the checkpoint directory.
    - `step`: the checkpoint step to read; `None` (default) reads the latest one.

    **Returns:**

    The configuration dict given to [`eqx_steps.checkpoint_save`][] (its
    JSON-representable entries).

    **Raises:**

    - `FileNotFoundError`: `workdir` holds no (such) checkpoint.
    - `ValueError`: the checkpoint's config item is missing or corrupt.
    """
    config = _read_item(
        workdir,
        step,
        _CONFIG,
        label="config",
        missing="; the configuration is stored with each checkpoint "
        "(`checkpoint_save(state, config, workdir)`).",
        optional=False,
    )
    assert config is not None
    return config


def load_data_state(
    workdir: str | os.PathLike, *, step: int | None = None
) -> dict[str, Any] | None:
    """Read the input pipeline's state stored with a checkpoint in `workdir`.

    **Arguments:**

    - `workdir`: the checkpoint directory.
    - `step`: the checkpoint step to read; `None` (default) reads the latest one.

    **Returns:**

    The `data_state` given to [`eqx_steps.checkpoint_save`][] (for a run of
    `BasicTrainer` on a Grain input, the state of the input's iterator at that
    step, see the "Data pipelines" page), or `None` when the step stores none (a
    run on a dict of arrays, or a checkpoint written before this item existed).

    **Raises:**

    - `FileNotFoundError`: `workdir` holds no (such) checkpoint.
    - `ValueError`: the item is corrupt.
    """
    return _read_item(
        workdir,
        step,
        _DATA,
        label="data item",
        missing=", so no input-pipeline state to read.",
        optional=True,
    )

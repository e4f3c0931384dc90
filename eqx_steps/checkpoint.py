"""Checkpoints of a `TrainState` (orbax).

`checkpoint_save`/`checkpoint_restore` are SCICO's checkpoint functions for an
Equinox `TrainState`: an orbax `CheckpointManager` in a work directory keeps the
last few steps, each in its own step directory that appears only once complete
(orbax writes to a temporary directory and renames it). Each step holds two
items: `state` (the arrays of the `TrainState`) and `config` (the run's
configuration as JSON, read back by `load_config`). Only arrays and JSON are
stored: the static parts of the state (the optimizer, `forward`, the model's
structure) come from the `state` given to `checkpoint_restore`, and loading never
runs code. This module writes nothing else in the work directory: a run folder's
other files (such as a command line's own `config.json`) belong to their writers.

The JSON items beside the state (`config`, the input pipeline's `data`) are
written here and read back by `load_config` and `load_data_state`
(`_checkpoint_json.py`); the work directory, its orbax manager and the errors
of a corrupt step are in `_checkpoint_parts.py`.

Exporting a trained model to one file (`save_model`/`load_model`) lives in
`eqx_steps.model_file`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import orbax.checkpoint as ocp

from ._checkpoint_json import (
    json_object,
    load_config as load_config,
    load_data_state as load_data_state,
)
from ._checkpoint_parts import (
    _check_state,
    _compare,
    _CONFIG,
    _config_dict,
    _corrupt,
    _DATA,
    _host_int,
    _is_key,
    _key_impl,
    _manager,
    _MAX_TO_KEEP,
    _remove_partial,
    _short,
    _STATE,
    _workdir,
    check_readable,
    CorruptCheckpointError as CorruptCheckpointError,
    latest_step as latest_step,
)
from ._validate import check_int
from .state import TrainState


# ---------------------------------------------------------------------------
# Checkpoints


def prepare_workdir(workdir: str | os.PathLike, *, clean: bool = True) -> list[str]:
    """Make `workdir` ready for checkpoints before a run starts.

    Creates it if needed, checks that files can be created in it (so that a
    read-only folder fails now, not at the first save after training), and, with
    `clean`, removes the temporary folders that an interrupted save left behind.
    In a multi-process job only process 0 should clean, before any process saves.

    **Arguments:**

    - `workdir`: the checkpoint directory.
    - `clean`: remove the leftover `*.orbax-checkpoint-tmp*` folders.

    **Returns:**

    The names of the folders removed.

    **Raises:**

    `OSError` (e.g. `PermissionError`, `NotADirectoryError`) naming `workdir`
    when it cannot be created or written to.
    """
    path = _workdir(workdir)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise type(e)(
            e.errno,
            f"checkpoint folder {str(path)!r} is not writable ({_short(e)}); "
            "choose a folder you can write to, or fix its permissions",
        ) from e
    return _remove_partial(path) if clean else []


def _save_failed(path: Path, step: int, error: Exception) -> OSError:
    """The error of a save that failed part-way, after removing its temporary
    folder; the complete steps are untouched."""
    _remove_partial(path)
    latest = latest_step(path)
    kept = "no earlier checkpoint" if latest is None else f"step {latest}"
    return OSError(
        f"could not save checkpoint step {step} in {str(path)!r} "
        f"({type(error).__name__}: {_short(error, 2000)}); the last complete "
        f"checkpoint ({kept}) is intact; free disk space or fix the folder, then "
        "resume",
    )


def checkpoint_save(
    state: TrainState,
    config: Mapping[str, Any] | Any,
    workdir: str | os.PathLike,
    *,
    max_to_keep: int = _MAX_TO_KEEP,
    data_state: Mapping[str, Any] | None = None,
) -> bool:
    """Save the arrays of a `TrainState` and the run's configuration.

    An orbax `CheckpointManager` in `workdir` (created if needed) stores, at step
    `int(state.step)`, the array leaves of `state` (`eqx.filter(state,
    eqx.is_array)`; PRNG keys as their key data) and `config` as JSON, and keeps
    the last `max_to_keep` steps. The save is synchronous and atomic: when this
    function returns the step directory is complete, and a save interrupted at
    any point (even by `SIGKILL`) leaves only orbax's temporary directory, never a
    step that looks complete.

    Only the JSON-representable entries of `config` are stored: callables (such
    as SCICO's `post_lst`), optimizers and arrays are left out. Read them back
    with [`eqx_steps.load_config`][]. Nothing else is written in `workdir`.

    Saving a step that is already the latest saved step does nothing (the state
    at a step is determined by the run) and returns `False`.

    **Arguments:**

    - `state`: the [`eqx_steps.TrainState`][] to save.
    - `config`: the run's configuration (a dict, a dataclass instance, or `None`).
    - `workdir`: the checkpoint directory.
    - `max_to_keep`: how many of the latest steps to keep (default 3).
    - `data_state`: the input pipeline's state at this step (a JSON object), stored
        as a third item, `data`, and read back by [`eqx_steps.load_data_state`][];
        `None` (default) stores none. `BasicTrainer` passes the state of a Grain
        input here, so that a resumed run reads on with the batches the
        uninterrupted run would have seen.

    **Returns:**

    `True` if a checkpoint was written.

    **Raises:**

    - `ValueError`: if `workdir` already holds a later step (a checkpoint of
        another run): restore it to resume, or use another directory.
    - `TypeError`: if `data_state` is not a JSON object.
    """
    _check_state(state)
    if data_state is not None:
        data_state = json_object("data_state", data_state)
    max_to_keep = check_int("max_to_keep", max_to_keep, minimum=1)
    path = _workdir(workdir)
    config_json = _config_dict(config)
    step = _host_int(state.step)
    arrays = jax.tree_util.tree_map(
        lambda x: jax.random.key_data(x) if _is_key(x) else x,
        eqx.filter(state, eqx.is_array),
    )
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            20,
            f"`workdir` {str(path)!r} is a file, not a folder; pass a folder for the "
            "checkpoints (it is created if needed)",
        )
    with _manager(path, create=True, max_to_keep=max_to_keep) as manager:
        latest = manager.latest_step()
        if latest is not None and step <= latest:
            if step == latest:
                return False
            raise ValueError(
                f"`workdir` {str(path)!r} already holds a checkpoint of step {latest}, "
                f"later than this state's step {step}; orbax would silently skip "
                "this save. Restore it with `checkpoint_restore(state, workdir)` to "
                "resume that run, or save into a new (or emptied) directory."
            )
        items = {
            _STATE: ocp.args.StandardSave(arrays),
            _CONFIG: ocp.args.JsonSave(config_json),
        }
        if data_state is not None:
            items[_DATA] = ocp.args.JsonSave(data_state)
        try:
            manager.save(step, args=ocp.args.Composite(**items))
            manager.wait_until_finished()
        except Exception as e:  # orbax and tensorstore raise ValueError, OSError...
            raise _save_failed(path, step, e) from e
    return True


class CheckpointFallbackWarning(UserWarning):
    """`checkpoint_restore(..., fallback=True)` skipped corrupt latest steps."""


def _restore_step(
    manager: ocp.CheckpointManager, path: Path, step: int, steps: list[int], target: Any
) -> Any:
    """The arrays of checkpoint `step`, compared with `target` first."""
    try:
        check_readable(path / str(step))  # before orbax: see check_readable
        items = manager.metadata(step).item_metadata
        metadata = None if items is None else items.get(_STATE)
        if metadata is None or not hasattr(metadata, "tree"):
            raise FileNotFoundError("the tree metadata of its state is missing")
    except Exception as e:
        raise _corrupt(path, step, steps, e) from e
    _compare(path, step, target, metadata)
    try:
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
        return manager.restore(step, args=args)[_STATE]
    except Exception as e:
        raise _corrupt(path, step, steps, e) from e


def checkpoint_restore(
    state: TrainState,
    workdir: str | os.PathLike,
    ok_no_ckpt: bool = False,
    *,
    fallback: bool = False,
) -> TrainState:
    """Restore the latest checkpoint in `workdir` into the structure of `state`.

    `state` gives the structure, shapes, dtypes, shardings and static parts
    (optimizer, `forward`, model structure); the checkpoint gives the values,
    restored bit-exactly. The checkpoint is compared with `state` leaf by leaf
    before anything is read.

    A corrupt or incomplete latest step raises rather than silently falling back
    to an older one; the error names the step directory and the older steps, so
    that deleting the bad step resumes from the previous one. With
    `fallback=True` the newest step that reads back is restored instead, with a
    `CheckpointFallbackWarning` that names the steps skipped and why.

    **Arguments:**

    - `state`: a [`eqx_steps.TrainState`][] built like the saved one (e.g. the
        initial state of the run).
    - `workdir`: the checkpoint directory.
    - `ok_no_ckpt`: return `state` unchanged when there is no checkpoint, instead
        of raising.
    - `fallback`: when the latest step is corrupt, restore the newest older step
        that is not (a state that does not match any step still raises).

    **Returns:**

    The restored `TrainState`.

    **Raises:**

    - `FileNotFoundError`: no checkpoint in `workdir` (and not `ok_no_ckpt`).
    - `ValueError`: the checkpoint does not match `state` (names the first
        mismatching leaf), or it is corrupt ([`eqx_steps.CorruptCheckpointError`][],
        a `ValueError`: a damaged step fails on its own line, with nothing else
        printed).
    """
    _check_state(state)
    path = _workdir(workdir)
    step = latest_step(path)
    if step is None:
        if ok_no_ckpt:
            return state
        what = "does not exist" if not path.exists() else "holds no complete checkpoint"
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} {what}; create one by training with "
            "checkpointing=True (or `checkpoint_save(state, config, workdir)`), or "
            "pass ok_no_ckpt=True to start from `state`."
        )

    arrays, static = eqx.partition(state, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(arrays)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(x):
        if isinstance(x, np.ndarray):
            return x  # orbax restores a numpy leaf as numpy, given one
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            shape, dtype = data.shape, data.dtype
        else:
            shape, dtype = x.shape, x.dtype
        sharding = getattr(x, "sharding", None) or one_device
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    target = jax.tree_util.tree_unflatten(treedef, [abstract(x) for x in leaves])
    with _manager(path, create=False) as manager:
        steps = sorted(manager.all_steps())
        candidates = [s for s in reversed(steps) if s <= step] if fallback else [step]
        errors: list[CorruptCheckpointError] = []
        for s in candidates:
            try:
                restored = _restore_step(manager, path, s, steps, target)
                break
            except CorruptCheckpointError as e:
                errors.append(e)
        else:
            raise errors[0]
    if errors:
        warnings.warn(
            CheckpointFallbackWarning(
                f"restored checkpoint step {s} of {str(path)!r}, not the latest: "
                + "; ".join(f"step {e.step} is corrupt ({e.reason})" for e in errors)
            ),
            stacklevel=2,
        )
    out = [
        jax.random.wrap_key_data(r, impl=_key_impl(x)) if _is_key(x) else r
        for x, r in zip(leaves, treedef.flatten_up_to(restored))
    ]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, out), static)

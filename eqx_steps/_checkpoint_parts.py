"""The parts of `eqx_steps.checkpoint` behind its public functions.

The work directory, its complete steps (`latest_step`) and its orbax manager,
how leaves are named and compared with a checkpoint, the configuration as JSON,
and the errors for a corrupt step or a failed save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree
from orbax.checkpoint.checkpoint_managers import LatestN

from .state import TrainState


_MAX_TO_KEEP = 3
# The items of a checkpoint step: the state's arrays and the run's JSON config.
_STATE = "state"
_CONFIG = "config"
# The input pipeline's state (JSON), in the checkpoints of runs that read a Grain input.
_DATA = "data"
# orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete.
_TMP_MARK = ".orbax-checkpoint-tmp"


def _workdir(workdir: str | os.PathLike) -> Path:
    if not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(
            f"`workdir` must be a path (str or os.PathLike), got "
            f"{type(workdir).__name__}: {workdir!r}."
        )
    return Path(os.path.abspath(os.fspath(workdir)))


@contextlib.contextmanager
def _manager(
    path: Path, *, create: bool, max_to_keep: int = _MAX_TO_KEEP
) -> Iterator[ocp.CheckpointManager]:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=LatestN(max_to_keep),
        create=create,
        # A returned save is a complete save.
        enable_async_checkpointing=False,
    )
    # Naming the handlers lets a fresh manager read a checkpoint's metadata.
    # (orbax 0.12.8 emits no Python warnings on these calls, even under `-W error`.)
    handlers = {
        _STATE: ocp.StandardCheckpointHandler(),
        _CONFIG: ocp.JsonCheckpointHandler(),
        _DATA: ocp.JsonCheckpointHandler(),
    }
    manager = ocp.CheckpointManager(path, item_handlers=handlers, options=options)
    try:
        yield manager
    finally:
        manager.close()


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    return getattr(x.dtype, "_impl", None)


def _path_str(path: tuple) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _orbax_name(path: tuple) -> tuple[str, ...]:
    # How orbax names a leaf (orbax.checkpoint.tree.str_keypath).
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            names.append(str(k.key))
        else:
            names.append(str(k))
    return tuple(names)


def _host_int(x: Any) -> int:
    # A replicated array of a multi-process run is not fully addressable; any
    # local copy holds the value.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return int(np.asarray(x))


def _short(error: BaseException, limit: int = 300) -> str:
    while error.__cause__ is not None:  # the root cause says what went wrong
        error = error.__cause__
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return first if len(first) <= limit else first[:limit] + "..."


def _jsonable(value: Any) -> tuple[bool, Any]:
    """`(True, json_value)` for JSON-representable values, `(False, None)` else."""
    if value is None or isinstance(value, (bool, str)):
        return True, value
    if isinstance(value, int):
        return True, int(value)
    if isinstance(value, float):
        return True, value
    if isinstance(value, np.generic) and not isinstance(value, np.void):
        return _jsonable(value.item())
    if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
        if _is_key(value):
            return False, None
        return _jsonable(np.asarray(value).item())
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                return False, None
            ok, v = _jsonable(v)
            if ok:
                out[k] = v
        return True, out
    if isinstance(value, (list, tuple)):
        items = [_jsonable(v) for v in value]
        if all(ok for ok, _ in items):
            return True, [v for _, v in items]
        return False, None
    return False, None


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"`config` must be a dict (or a dataclass instance, or None), got "
            f"{type(config).__name__}."
        )
    _, out = _jsonable(dict(config))
    return out


def _check_state(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(
            f"`state` must be an eqx_steps.TrainState, got {type(state).__name__}; "
            "build one with `TrainState.create(model, tx)`."
        )


def _remove_partial(path: Path) -> list[str]:
    """Remove the temporary folders of saves that did not complete (a crash, a
    kill, a full disk); the names removed."""
    if not path.is_dir():
        return []
    removed = [p for p in path.iterdir() if _TMP_MARK in p.name]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in removed]


class CorruptCheckpointError(ValueError):
    """A checkpoint step that cannot be read back: incomplete or damaged files.

    Raised by [`eqx_steps.checkpoint_restore`][] (and so by `BasicTrainer` and
    the commands) for the latest step, unless `fallback=True`. A `ValueError`;
    its message names the step folder, the cause and the older steps on disk.

    **Attributes:** `step` (the step that cannot be read) and `reason` (the
    error that reading it raised, on one line).
    """

    def __init__(self, text: str, step: int, reason: str):
        super().__init__(text)
        self.step, self.reason = step, reason


def check_readable(step_dir: Path) -> None:
    """Read every stored value of a step's arrays, with blocking calls.

    orbax 0.12.8 reads a step's arrays (`manager.metadata`, `manager.restore`)
    as one `asyncio.gather` over tensorstore futures, run by
    `asyncio_utils.run_sync` in a fresh event loop that it closes as soon as the
    gather raises: to avoid a thread-safety race it does not use `asyncio.run`,
    so the other reads are not cancelled. On a damaged step the first failed
    read ends the gather, the loop is closed, and each read still in flight then
    completes into the closed loop: tensorstore's completion callback calls
    `loop.call_soon_threadsafe`, which raises "RuntimeError: Event loop is
    closed", printed on stderr as an unraisable exception, one traceback per
    read, after the error was reported.

    Reading the raw stored values here first, with tensorstore's blocking
    `result()` and no event loop, makes a damaged step (a truncated or missing
    data file, a damaged manifest) fail before orbax starts, with nothing left
    in flight that could call back. It reads the step's bytes once more than a
    restore does (the second read comes from the page cache).

    **Raises:**

    The error of the first value that cannot be read (tensorstore's
    `ValueError`, or an `OSError`).
    """
    import tensorstore as ts

    base = step_dir / _STATE
    if not (base / "manifest.ocdbt").is_file():
        return  # not an OCDBT step: orbax's own reading is all there is
    store = ts.KvStore.open({"driver": "ocdbt", "base": base.as_uri() + "/"}).result()
    keys = store.list().result()
    for start in range(0, len(keys), 64):  # a bounded number of reads in flight
        reads = [store.read(key) for key in keys[start : start + 64]]
        for read in reads:
            read.result()


def _corrupt(
    path: Path, step: int, steps: list[int], error: BaseException
) -> CorruptCheckpointError:
    older = [s for s in steps if s < step]
    hint = (
        f" Older steps on disk: {older}; restore with fallback=True (the command: "
        f"--resume --fallback), or delete {str(path / str(step))!r}, to resume "
        f"from step {older[-1]}."
        if older
        else " No older step is on disk: start the run afresh."
    )
    reason = f"{type(error).__name__}: {_short(error)}"
    return CorruptCheckpointError(
        f"checkpoint step {step} in {str(path)!r} is incomplete or corrupt "
        f"({reason}).{hint}",
        step,
        reason,
    )


def _compare(path: Path, step: int, target: PyTree, metadata: Any) -> None:
    """Raise a `ValueError` at the first leaf of `target` unlike the checkpoint."""
    stored = {
        _orbax_name(p): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(metadata.tree)[0]
    }
    where = f"checkpoint step {step} in {str(path)!r}"
    fix = (
        "; restore into a state built like the saved one (same model, model state, "
        "optimizer and key), or use another `workdir`."
    )
    wanted = jax.tree_util.tree_flatten_with_path(target)[0]
    for p, leaf in wanted:
        meta = stored.pop(_orbax_name(p), None)
        if meta is None:
            raise ValueError(
                f"`state` leaf `{_path_str(p)}` (shape {tuple(leaf.shape)}) is not in "
                f"the {where}{fix}"
            )
        shape = tuple(getattr(meta, "shape", None) or ())
        dtype = getattr(meta, "dtype", None)
        if shape != tuple(leaf.shape):
            raise ValueError(
                f"`state` leaf `{_path_str(p)}` has shape {tuple(leaf.shape)} but "
                f"shape {shape} in the {where}{fix}"
            )
        if dtype is not None and jnp.dtype(dtype) != jnp.dtype(leaf.dtype):
            raise ValueError(
                f"`state` leaf `{_path_str(p)}` has dtype {jnp.dtype(leaf.dtype)} but "
                f"dtype {jnp.dtype(dtype)} in the {where}{fix}"
            )
    if stored:
        name = ".".join(next(iter(stored)))
        raise ValueError(
            f"the {where} has a leaf `{name}` that `state` lacks (e.g. another model "
            f"or optimizer){fix}"
        )


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The latest complete checkpoint step in `workdir`.

    **Arguments:**

    - `workdir`: the checkpoint directory.

    **Returns:**

    The step, or `None` when `workdir` does not exist or holds no complete
    checkpoint.
    """
    # A directory listing rather than an orbax manager: a manager synchronises
    # the processes of a multi-process job, and a process that skipped it (say,
    # because the folder did not exist yet) would leave the others waiting.
    # orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to
    # `<step>` once complete, so the plain numeric names are the complete steps.
    path = _workdir(workdir)
    if not path.is_dir():
        return None
    steps = [int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps, default=None)

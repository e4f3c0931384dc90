"""Export of a trained model to one file, with a checksum (`save_model`, `load_model`).

A model file is a small header followed by the payload:

    b"EQXSTEPS-MODEL\\n"          the magic string (15 bytes)
    version                       1 byte, currently 1
    SHA-256 of the payload        32 bytes
    payload                       the leaves of `(model, model_state)`, written by
                                  `eqx.tree_serialise_leaves` (NumPy's `.npy`
                                  format, no pickle; PRNG keys as their key data)

`load_model` verifies the checksum before it reads a single leaf, so a file with
flipped bytes is refused ("corrupt: checksum mismatch"), never loaded into wrong
weights. Files of the first format (the bare payload, no header) cannot be
verified: `load_model` refuses them unless asked with `allow_unverified=True`
(then re-save them with `save_model` to add the checksum).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ._checkpoint_parts import _is_key, _key_impl, _short
from ._io import atomic_write
from ._validate import check_bool


MAGIC = b"EQXSTEPS-MODEL\n"
"""The first bytes of a model file written by `save_model`."""

FORMAT_VERSION = 1
"""The model-file format `save_model` writes (the byte after `MAGIC`)."""

_DIGEST = 32  # SHA-256
_HEADER = len(MAGIC) + 1 + _DIGEST


def _serialise(f: Any, x: Any) -> None:
    if _is_key(x):
        x = jax.random.key_data(x)
    eqx.default_serialise_filter_spec(f, x)


def _deserialise(f: Any, x: Any) -> Any:
    if _is_key(x):
        return jax.random.wrap_key_data(jnp.load(f), impl=_key_impl(x))
    return eqx.default_deserialise_filter_spec(f, x)


def _path(name: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`{name}` must be a file path (str or os.PathLike), got "
            f"{type(path).__name__}: {path!r}."
        )
    return Path(os.fspath(path))


def save_model(
    path: str | os.PathLike, model: PyTree, model_state: eqx.nn.State | None = None
) -> None:
    """Write a model (and its state) to one file, for export.

    The leaves of `(model, model_state)` are written with
    `eqx.tree_serialise_leaves` (NumPy's `.npy` format, no pickle; PRNG keys as
    their key data) after a header holding a SHA-256 checksum of them (see
    `eqx_steps.model_file`), to a temporary file in the same directory, which then
    replaces `path`: a reader never sees a half-written file. `path` is used as
    given (no suffix is added).

    **Arguments:**

    - `path`: the file to write; its directory is created if needed.
    - `model`: the Equinox model (e.g. `state.model`).
    - `model_state`: its `eqx.nn.State`, or `None`.

    **Returns:**

    Nothing.

    **Raises:**

    `ValueError` when `path` is an existing folder.
    """
    file = _path("path", path)
    if file.is_dir():
        raise ValueError(
            f"`path` = {str(file)!r} is a folder; save_model writes one file: pass a "
            f"file name, e.g. {str(file / 'model.eqx')!r}."
        )
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, (model, model_state), filter_spec=_serialise)
    payload = buffer.getvalue()
    header = MAGIC + bytes([FORMAT_VERSION]) + hashlib.sha256(payload).digest()
    atomic_write(file, header + payload)


def _payload(file: Path, data: bytes, allow_unverified: bool) -> bytes:
    """The verified payload of a model file's bytes."""
    if not data.startswith(MAGIC):
        if allow_unverified:
            return data
        raise ValueError(
            f"model file {str(file)!r} has no eqx_steps header, so its integrity "
            "cannot be checked: it was written by an earlier eqx_steps (or is not a "
            "model file). If you trust it, load it with allow_unverified=True and "
            "save it again with save_model to add a checksum."
        )
    if len(data) < _HEADER:
        raise ValueError(
            f"model file {str(file)!r} is corrupt: truncated inside its header "
            f"({len(data)} bytes); save the model again."
        )
    version = data[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise ValueError(
            f"model file {str(file)!r} has format version {version}, but this "
            f"eqx_steps reads version {FORMAT_VERSION}; load it with the eqx_steps "
            "that wrote it, or save it again."
        )
    digest, payload = data[len(MAGIC) + 1 : _HEADER], data[_HEADER:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(
            f"model file {str(file)!r} is corrupt: checksum mismatch (its bytes "
            "changed after save_model wrote it); restore it from a good copy or save "
            "the model again."
        )
    return payload


def load_model(
    path: str | os.PathLike,
    model: PyTree,
    model_state: eqx.nn.State | None = None,
    *,
    allow_unverified: bool = False,
) -> tuple[PyTree, eqx.nn.State | None]:
    """Read a model written by `save_model` into the structure of a template.

    The file's checksum is verified before anything is read from it.

    **Arguments:**

    - `path`: the file written by [`eqx_steps.save_model`][].
    - `model`: a model of the same structure, shapes and dtypes (e.g. freshly
        initialised, or from `eqx.filter_eval_shape`); its values are replaced.
    - `model_state`: a like-structured `eqx.nn.State`, or `None` if none was
        saved.
    - `allow_unverified`: also load a file without a checksum (written by an
        earlier eqx_steps); its integrity is not checked.

    **Returns:**

    A 2-tuple `(model, model_state)` with the saved values.

    **Raises:**

    - `FileNotFoundError`: `path` does not exist.
    - `ValueError`: `path` is a folder; the file is corrupt (checksum mismatch,
        truncated), has no checksum (unless `allow_unverified`), or holds another
        structure than the template.
    """
    file = _path("path", path)
    check_bool("allow_unverified", allow_unverified)
    if file.is_dir():
        raise ValueError(
            f"`path` = {str(file)!r} is a folder, not a model file; pass the file "
            "that save_model wrote (a checkpoint folder is read with "
            "checkpoint_restore)."
        )
    if not file.is_file():
        raise FileNotFoundError(
            f"model file {str(file)!r} does not exist; write one with "
            "`save_model(path, model, model_state)`."
        )
    f = io.BytesIO(_payload(file, file.read_bytes(), allow_unverified))
    fix = (
        "pass a `model` (and `model_state`) built like the saved one: same "
        "architecture, sizes and dtypes, and a model_state exactly when one was saved."
    )
    try:
        out = eqx.tree_deserialise_leaves(
            f, (model, model_state), filter_spec=_deserialise
        )
    except (RuntimeError, ValueError, EOFError, OSError) as e:
        raise ValueError(
            f"model file {str(file)!r} does not match the given template "
            f"({_short(e)}); {fix}"
        ) from e
    if f.read(1):
        raise ValueError(
            f"model file {str(file)!r} holds more leaves than the given template; {fix}"
        )
    return out

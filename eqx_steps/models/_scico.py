"""SCICO's pretrained DnCNN weights (Flax msgpack files) loaded into `DnCNN`.

SCICO saves a trained Flax model with `flax.serialization.msgpack_serialize` of
its variables `{"params": ..., "batch_stats": ...}`: nested msgpack maps whose
array leaves are msgpack extension objects of type 1, each holding the msgpack
of `(shape, dtype name, C-ordered bytes)`. That is all this reader decodes (no
Flax, and no pickle: the file is data only).
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from .._pretrained import SCICO_DNCNN_VARIANTS as SCICO_DNCNN_VARIANTS
from .._validate import check_choice, is_int
from ._blocks import ConvBNBlock
from ._dncnn import DnCNN


_ARG = "variant_or_path"
_DATA_PACKAGE = "eqx_steps.models"  # holds scico_dncnn/ (package data)
_NDARRAY_EXT = 1  # flax.serialization's msgpack extension code for an ndarray
_BLOCK = re.compile(r"ConvBNBlock_(\d+)")
# The batch norm's count of updates given to a loaded model: large enough that
# Equinox's zero-debiasing factor `1 - momentum**count` is exactly 1.0 (in float32
# and float64, for any momentum up to 0.9999), so the running averages are used as
# they are, as Flax uses them, and further training continues them as Flax would.
_WARM_COUNT = 2**20


class _NotDnCNN(ValueError):
    """The file is not a Flax msgpack of SCICO's DnCNN; the message says why."""


def _ndarray(data: bytes) -> np.ndarray:
    """Decode Flax's msgpack encoding of an ndarray: `(shape, dtype, bytes)`."""
    try:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
        dtype = np.dtype(jnp.dtype(dtype_name.decode("ascii")))
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise _NotDnCNN(f"an array entry cannot be decoded ({e})") from None
    if not isinstance(shape, list) or not all(is_int(n) and n >= 0 for n in shape):
        raise _NotDnCNN(f"an array entry has shape {shape!r}")
    if dtype.kind not in "biufc" or not isinstance(buffer, bytes):
        raise _NotDnCNN(f"an array entry has dtype {dtype}")
    array = np.frombuffer(buffer, dtype=dtype)
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise _NotDnCNN(f"an array entry of shape {shape} holds {array.size} values")
    return array.reshape(shape)


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _NDARRAY_EXT:
        raise _NotDnCNN(f"it holds a msgpack extension of type {code}, not an array")
    return _ndarray(data)


def _read_flax_msgpack(data: bytes) -> Any:
    """The tree of dicts and NumPy arrays that Flax's `msgpack_restore` gives."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False)
    except _NotDnCNN:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise _NotDnCNN(f"it is not msgpack data ({type(e).__name__}: {e})") from None


def _entry(tree: Any, path: str) -> Any:
    """`tree["a"]["b"]` for `path = "a/b"`, or `_NotDnCNN` naming what is missing."""
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise _NotDnCNN(f"it has no entry {path!r}")
        node = node[part]
    return node


def _array(tree: Any, path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The floating array at `path`, checked to have `shape`."""
    value = _entry(tree, path)
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        raise _NotDnCNN(f"its entry {path!r} is not a floating-point array")
    if value.shape != shape:
        raise _NotDnCNN(f"its entry {path!r} has shape {value.shape}, not {shape}")
    return value


def _block_count(params: Any) -> int:
    """The number of `ConvBNBlock_i` entries, checked to be `0 .. n - 1` and
    alone beside `conv_start` and `conv_end`."""
    if not isinstance(params, Mapping):
        raise _NotDnCNN("its 'params' entry is not a mapping")
    blocks = sorted(int(m[1]) for k in params if (m := _BLOCK.fullmatch(str(k))))
    if blocks != list(range(len(blocks))):
        raise _NotDnCNN(f"its blocks are numbered {blocks}, not 0 to {len(blocks) - 1}")
    expected = {"conv_start", "conv_end"} | {f"ConvBNBlock_{i}" for i in blocks}
    if set(params) != expected:
        extra = sorted(map(str, set(params) - expected))
        missing = sorted(expected - set(params))
        raise _NotDnCNN(f"its 'params' has unexpected {extra} / lacks {missing}")
    return len(blocks)


def _kernel(params: Any, path: str, shape: tuple[int, ...], dtype) -> jax.Array:
    """Flax's `(kh, kw, in, out)` kernel at `path` as Equinox's `(out, in, kh, kw)`."""
    return jnp.asarray(_array(params, path, shape).transpose(3, 2, 0, 1), dtype)


def _vector(tree: Any, path: str, size: int, dtype) -> jax.Array:
    return jnp.asarray(_array(tree, path, (size,)), dtype)


def _placeholder(leaf: Any) -> Any:
    """Zeros for a `jax.ShapeDtypeStruct` (weakly typed if it is, as the batch
    norms' counters are); other leaves unchanged."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    zeros = np.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(zeros.item() if leaf.weak_type and not leaf.shape else zeros)


def _block(params: Any, i: int, block: ConvBNBlock, dtype) -> ConvBNBlock:
    """`block` with the parameters of Flax's `ConvBNBlock_{i}`."""
    kh, kw = block.conv.kernel_size
    n = block.conv.out_channels
    prefix = f"ConvBNBlock_{i}"
    return eqx.tree_at(
        lambda b: (b.conv.weight, b.norm.weight, b.norm.bias),
        block,
        (
            _kernel(params, f"{prefix}/Conv_0/kernel", (kh, kw, n, n), dtype),
            _vector(params, f"{prefix}/BatchNorm_0/scale", n, dtype),
            _vector(params, f"{prefix}/BatchNorm_0/bias", n, dtype),
        ),
    )


def _averages(
    averages: Any, i: int, norm: eqx.nn.BatchNorm, state: eqx.nn.State, dtype
) -> eqx.nn.State:
    """`state` with Flax's running averages of `ConvBNBlock_{i}` for `norm`."""
    assert norm.batch_counter is not None and norm.batch_state_index is not None
    path = f"ConvBNBlock_{i}/BatchNorm_0"
    mean = _vector(averages, f"{path}/mean", norm.input_size, dtype)
    var = _vector(averages, f"{path}/var", norm.input_size, dtype)
    state = state.set(norm.batch_counter, jnp.array(_WARM_COUNT))
    return state.set(norm.batch_state_index, (mean, var))


def _dncnn_from_variables(variables: Any) -> tuple[DnCNN, eqx.nn.State]:
    """Build the `DnCNN` and its state from SCICO's `{"params", "batch_stats"}`."""
    params, averages = _entry(variables, "params"), _entry(variables, "batch_stats")
    start = _entry(params, "conv_start/kernel")
    if not isinstance(start, np.ndarray) or start.ndim != 4:
        raise _NotDnCNN("its entry 'params/conv_start/kernel' is not a 4-D array")
    kh, kw, channels, filters = start.shape
    dtype = jax.dtypes.canonicalize_dtype(start.dtype)
    # The architecture only: every array is replaced below, so a random
    # initialisation (compiled per shape, seconds) would be wasted.
    skeleton = eqx.filter_eval_shape(
        eqx.nn.make_with_state(DnCNN),
        depth=_block_count(params) + 2,
        channels=channels,
        num_filters=filters,
        kernel_size=(kh, kw),
        dtype=dtype,
        key=jax.random.key(0),
    )
    model, state = jax.tree_util.tree_map(_placeholder, skeleton)
    for i, block in enumerate(model.blocks):
        state = _averages(averages, i, block.norm, state, dtype)
    model = eqx.tree_at(
        lambda m: (m.conv_start.weight, m.blocks, m.conv_end.weight),
        model,
        (
            _kernel(params, "conv_start/kernel", (kh, kw, channels, filters), dtype),
            tuple(_block(params, i, b, dtype) for i, b in enumerate(model.blocks)),
            _kernel(params, "conv_end/kernel", (kh, kw, filters, channels), dtype),
        ),
    )
    return model, state


def _source(variant_or_path: str | os.PathLike) -> tuple[bytes, str]:
    """The file's bytes and how to name it in a message."""
    if isinstance(variant_or_path, str) and variant_or_path in SCICO_DNCNN_VARIANTS:
        files = importlib.resources.files(_DATA_PACKAGE) / "scico_dncnn"
        name = f"dncnn{variant_or_path}.mpk"
        return (files / name).read_bytes(), f"the shipped {name}"
    if not isinstance(variant_or_path, str | os.PathLike):
        raise TypeError(
            f"`{_ARG}` must be a variant name or a path, got {variant_or_path!r} "
            f"({type(variant_or_path).__name__}); use one of "
            f"{', '.join(map(repr, SCICO_DNCNN_VARIANTS))} or a path to a .mpk file."
        )
    path = os.fspath(variant_or_path)
    looks_like_path = isinstance(variant_or_path, os.PathLike) or (
        os.sep in path or path.endswith(".mpk") or os.path.exists(path)
    )
    if not looks_like_path:
        try:
            check_choice(_ARG, path, SCICO_DNCNN_VARIANTS)
        except ValueError as e:  # add the other accepted form and SCICO's others
            raise ValueError(
                f"{str(e).rstrip('.')}, or the path of a Flax msgpack file of SCICO's "
                "DnCNN (SCICO's 17L, 17H and 17N are not shipped: pass their path)."
            ) from None
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"`{_ARG}` = {path!r}: no such file; give the path of a Flax msgpack "
            f"file of SCICO's DnCNN, or one of the shipped variants "
            f"{', '.join(map(repr, SCICO_DNCNN_VARIANTS))}."
        )
    with open(path, "rb") as f:
        return f.read(), repr(path)


def load_scico_dncnn(variant_or_path: str | os.PathLike) -> tuple[DnCNN, eqx.nn.State]:
    """SCICO's pretrained DnCNN denoiser as an `eqx_steps.models.DnCNN`.

    Reads a Flax msgpack file of SCICO's `DnCNNNet` variables, either one of the
    five shipped with this package (SCICO's own files, BSD-3 licence, in
    `eqx_steps/models/scico_dncnn/`) or any file of that format, e.g. one written
    by SCICO's `save_variables`. The depth, channels, number of filters and kernel
    size are read from the file. Flax's names map onto the model as
    `conv_start/kernel` -> `conv_start.weight`, `ConvBNBlock_i/Conv_0/kernel` ->
    `blocks[i].conv.weight` (kernels transposed from Flax's `(kh, kw, in, out)` to
    Equinox's `(out, in, kh, kw)`), `ConvBNBlock_i/BatchNorm_0/scale` and `bias` ->
    `blocks[i].norm.weight` and `bias`, `conv_end/kernel` -> `conv_end.weight`,
    and `batch_stats` `mean` and `var` -> the batch norms' running averages in the
    returned state.

    In inference the model gives Flax's outputs: Flax normalises by the running
    averages as they are, where Equinox divides them by `1 - momentum**count`
    (zero-debiasing). The state therefore holds SCICO's averages unchanged with an
    update count of `2**20`, for which that factor is exactly `1.0`; and training
    the loaded model further updates the averages exactly as Flax would (storing
    pre-divided statistics with a small count would instead make the first
    training update overweight the new batch).

    The variant "6N" takes two channels, the noisy image and a constant plane
    holding the noise standard deviation, and its first output channel is the
    denoised image (SCICO's `DnCNN("6N")(x, sigma)`); the others take and return
    one channel. [`eqx_steps.denoise.denoise_image`][] handles both, colour images and
    large images.

    !!! example

        ```python
        model, state = eqx_steps.models.load_scico_dncnn("6M")
        denoised, _ = eqx.nn.inference_mode(model)(noisy[..., None], state)
        ```

    **Arguments:**

    - `variant_or_path`: one of `"6L"`, `"6M"`, `"6H"`, `"6N"`, `"17M"` (the
        shipped files), or the path of a Flax msgpack file of SCICO's DnCNN.

    **Returns:**

    `(model, state)`: the `DnCNN` (in training mode, as every bundled model is
    built; apply `eqx.nn.inference_mode` to denoise) and its `eqx.nn.State` with
    the batch-norm running averages.

    **Raises:**

    `ValueError` for an unknown variant name (listing the valid ones) or a file
    that is not a Flax msgpack of SCICO's DnCNN (saying what is wrong),
    `FileNotFoundError` for a path that does not exist, `TypeError` for an
    argument that is neither a string nor a path.
    """
    data, source = _source(variant_or_path)
    try:
        return _dncnn_from_variables(_read_flax_msgpack(data))
    except _NotDnCNN as e:
        raise ValueError(
            f"`{_ARG}` = {source} is not a Flax msgpack file of SCICO's DnCNN: {e}. "
            "Give a file written by SCICO's `save_variables` (Flax's "
            "`msgpack_serialize` of a `DnCNNNet`'s {'params', 'batch_stats'}), or "
            f"one of the shipped variants {', '.join(map(repr, SCICO_DNCNN_VARIANTS))}."
        ) from None

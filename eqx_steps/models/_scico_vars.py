"""SCICO users' trained Flax variables loaded into the bundled Equinox models.

Each model has a fixed correspondence between Flax's parameter paths (the names
Flax gives modules in creation order: `ConvBNBlock_0/Conv_0/kernel`,
`ResNet_0/BatchNorm_0/scale`, ...) and the model's leaves; the loader checks
the whole set of names and shapes before changing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._blocks import ConvBNMultiBlock
from ._convbn import ConvBNNet
from ._dncnn import DnCNN
from ._layers import ChannelsLastBatchNorm
from ._modl import MoDLNet
from ._odp import ODPNet
from ._scico import _WARM_COUNT
from ._unet import UNet


Getter = Callable[[Any], Any]
# (Flax path under "params", getter of the model's leaf, is it a conv kernel)
ParamEntry = tuple[str, Getter, bool]
# (Flax path of a BatchNorm module under "batch_stats", getter of the layer)
NormEntry = tuple[str, Getter]

_ODP_FLAX_BLOCK = {
    "denoise": ("ODPProxDnBlock", "ResNet_0"),
    "deconv": ("ODPProxDcnvBlock", "resnet"),
    "grad_desc": ("ODPGrDescBlock", "resnet"),
}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _then(outer: Getter, inner: Getter) -> Getter:
    return lambda m: inner(outer(m))


def _conv_bn(prefix: str, get: Getter) -> tuple[list[ParamEntry], list[NormEntry]]:
    """A `ConvBNBlock` (or the conv + norm of Flax's pool/upsample blocks)."""
    norm = _join(prefix, "BatchNorm_0")
    params = [
        (_join(prefix, "Conv_0/kernel"), _then(get, lambda b: b.conv.weight), True),
        (f"{norm}/scale", _then(get, lambda b: b.norm.weight), False),
        (f"{norm}/bias", _then(get, lambda b: b.norm.bias), False),
    ]
    return params, [(norm, _then(get, lambda b: b.norm))]


def _blocks(
    prefix: str, get: Getter, n: int, name: str = "ConvBNBlock"
) -> tuple[list[ParamEntry], list[NormEntry]]:
    params, norms = [], []
    for i in range(n):
        p, q = _conv_bn(
            _join(prefix, f"{name}_{i}"), _then(get, lambda m, i=i: m.blocks[i])
        )
        params += p
        norms += q
    return params, norms


def _convbn_net(prefix: str, get: Getter, net: ConvBNNet):
    """SCICO's `ConvBNNet` / `ResNet`: blocks, then `Conv_0` and `BatchNorm_0`."""
    params, norms = _blocks(prefix, get, len(net.blocks))
    norm = _join(prefix, "BatchNorm_0")
    params += [
        (_join(prefix, "Conv_0/kernel"), _then(get, lambda m: m.conv_end.weight), True),
        (f"{norm}/scale", _then(get, lambda m: m.norm_end.weight), False),
        (f"{norm}/bias", _then(get, lambda m: m.norm_end.bias), False),
    ]
    return params, norms + [(norm, _then(get, lambda m: m.norm_end))]


def _unet(model: UNet):
    params: list[ParamEntry] = []
    norms: list[NormEntry] = []

    def add(pair):
        params.extend(pair[0])
        norms.extend(pair[1])

    def multi(index: int, get: Callable[[UNet], ConvBNMultiBlock]):
        n = len(get(model).blocks)
        add(_blocks(f"ConvBNMultiBlock_{index}", get, n))

    multi(0, lambda m: m.block_in)
    levels = len(model.down)
    for i in range(levels):
        add(_conv_bn(f"ConvBNPoolBlock_{i}", lambda m, i=i: m.down[i].block))
        multi(1 + i, lambda m, i=i: m.down_blocks[i])
    for j in range(levels):
        add(_conv_bn(f"ConvBNUpsampleBlock_{j}", lambda m, j=j: m.up[j].block))
        multi(1 + levels + j, lambda m, j=j: m.up_blocks[j])
    params.append(("Conv_0/kernel", lambda m: m.conv_out.weight, True))
    return params, norms


def _correspondence(model: Any) -> tuple[list[ParamEntry], list[NormEntry]]:
    """Flax's names for the model's parameters and batch norms."""
    if isinstance(model, DnCNN):
        params, norms = _blocks("", lambda m: m, len(model.blocks))
        params = [
            ("conv_start/kernel", lambda m: m.conv_start.weight, True),
            *params,
            ("conv_end/kernel", lambda m: m.conv_end.weight, True),
        ]
        return params, norms
    if isinstance(model, ConvBNNet):  # and ResNet, its subclass
        return _convbn_net("", lambda m: m, model)
    if isinstance(model, UNet):
        return _unet(model)
    if isinstance(model, MoDLNet):
        params, norms = _convbn_net("ResNet_0", lambda m: m.resnet, model.resnet)
        return [("lmbda", lambda m: m.lmbda, False), *params], norms
    if isinstance(model, ODPNet):
        name, inner = _ODP_FLAX_BLOCK[model.block]
        params, norms = [], []
        for i, block in enumerate(model.blocks):
            prefix = f"{name}_{i}"
            get_block = lambda m, i=i: m.blocks[i]  # noqa: E731
            params.append(
                (f"{prefix}/alpha", _then(get_block, lambda b: b.alpha), False)
            )
            p, q = _convbn_net(
                f"{prefix}/{inner}", _then(get_block, lambda b: b.resnet), block.resnet
            )
            params += p
            norms += q
        return params, norms
    raise TypeError(
        f"`model` must be one of eqx_steps.models' DnCNN, ConvBNNet, ResNet, UNet, "
        f"MoDLNet or ODPNet, got {type(model).__name__}."
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a/b": leaf}` for the nested mappings of a Flax variable collection."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, _join(prefix, str(k))))
    return out


def _mismatch(
    collection: str, expected: list[str], given: dict[str, Any]
) -> str | None:
    """The first path (in the model's order, then sorted) present on one side only."""
    for path in expected:
        if path not in given:
            return f"'{collection}/{path}' is missing"
    extra = sorted(set(given) - set(expected))
    if extra:
        return f"'{collection}/{extra[0]}' is not a parameter of this model"
    return None


def from_scico_variables(
    model: Any, variables: Mapping[str, Any]
) -> tuple[Any, eqx.nn.State]:
    """Load a SCICO user's trained Flax variables into the same Equinox model.

    `variables` is the `{"params": ..., "batch_stats": ...}` dict of arrays that
    SCICO's trainer returns (`modvar` of `BasicFlaxTrainer.train()`), that
    `scico.flax.load_variables` reads, or that an orbax checkpoint of SCICO holds
    (nested dicts or Flax `FrozenDict`s of NumPy or JAX arrays). `model` is the
    eqx_steps model of the same architecture (`DnCNN`, `ConvBNNet`, `ResNet`,
    `UNet`, `MoDLNet` or `ODPNet`, built with SCICO's constructor arguments);
    its arrays are replaced and its operator (MoDL, ODP) kept.

    Flax's kernels `(kh, kw, in, out)` become Equinox's `(out, in, kh, kw)`; the
    batch norms' `scale` and `bias` their `weight` and `bias`; `batch_stats`
    `mean` and `var` their running averages in the returned state, with the
    same no-debias rule as [`eqx_steps.models.load_scico_dncnn`][]: an update
    count of `2**20`, for which Equinox's zero-debiasing factor is exactly 1, so
    inference uses SCICO's averages as they are, and further training moves
    them as Flax would.

    **Arguments:**

    - `model`: the Equinox model, made by calling its class (e.g.
        `MoDLNet(op, 2, 1, 64, 4, 4, key=key)`): the state is made here, so the
        model of `eqx.nn.make_with_state`, whose initial state Equinox deletes,
        is refused.
    - `variables`: SCICO's Flax variables.

    **Returns:**

    `(model, model_state)`: the model with SCICO's parameters and a new
    `eqx.nn.State` with SCICO's batch statistics.

    **Raises:**

    `ValueError` naming the first differing path if a name is missing or extra
    or a shape differs (e.g. variables of another depth); `TypeError` for a
    model of another type.
    """
    params_map, norms_map = _correspondence(model)
    if not isinstance(variables, Mapping) or not {"params", "batch_stats"} <= set(
        variables
    ):
        raise ValueError(
            "`variables` must be SCICO's Flax variables, a mapping with 'params' "
            f"and 'batch_stats', got {type(variables).__name__}"
            + (
                f" with keys {sorted(variables)}"
                if isinstance(variables, Mapping)
                else ""
            )
            + "."
        )
    params = _flatten(variables["params"])
    stats = _flatten(variables["batch_stats"])
    expected_stats = [f"{p}/{s}" for p, _ in norms_map for s in ("mean", "var")]
    problem = _mismatch("params", [p for p, _, _ in params_map], params) or _mismatch(
        "batch_stats", expected_stats, stats
    )
    if problem is None:
        problem = _shape_problem(model, params_map, norms_map, params, stats)
    if problem is not None:
        raise ValueError(
            f"`variables` do not fit this {type(model).__name__}: {problem}. Build "
            "the model with the constructor arguments SCICO's model was trained with "
            "(depth, channels, num_filters, block_depth, kernel_size, block)."
        )
    values = []
    for path, get, is_kernel in params_map:
        leaf = get(model)
        array = np.asarray(params[path])
        if is_kernel:
            array = array.transpose(3, 2, 0, 1)
        values.append(jnp.asarray(array, leaf.dtype))
    getters = [get for _, get, _ in params_map]
    model = eqx.tree_at(lambda m: [g(m) for g in getters], model, values)
    try:
        state = eqx.nn.State(model)
    except ValueError as error:  # make_with_state deleted the initial state
        raise ValueError(
            "from_scico_variables makes the model state itself: pass the model "
            f"made by calling its class, e.g. `{type(model).__name__}(..., "
            "key=key)`, not the model returned by `eqx.nn.make_with_state` (its "
            "initial state is deleted)."
        ) from error
    for path, get in norms_map:
        norm: ChannelsLastBatchNorm = get(model)
        assert norm.batch_counter is not None and norm.batch_state_index is not None
        dtype = norm.weight.dtype if norm.weight is not None else jnp.float32
        mean = jnp.asarray(np.asarray(stats[f"{path}/mean"]), dtype)
        var = jnp.asarray(np.asarray(stats[f"{path}/var"]), dtype)
        state = state.set(norm.batch_counter, jnp.array(_WARM_COUNT))
        state = state.set(norm.batch_state_index, (mean, var))
    return model, state


def _shape_problem(model, params_map, norms_map, params, stats) -> str | None:
    for path, get, is_kernel in params_map:
        shape = tuple(get(model).shape)
        if is_kernel:
            shape = (shape[2], shape[3], shape[1], shape[0])
        given = tuple(np.shape(params[path]))
        if given != shape:
            return f"'params/{path}' has shape {given}, the model's {shape}"
    for path, get in norms_map:
        size = (get(model).input_size,)
        for s in ("mean", "var"):
            given = tuple(np.shape(stats[f"{path}/{s}"]))
            if given != size:
                return f"'batch_stats/{path}/{s}' has shape {given}, the model's {size}"
    return None

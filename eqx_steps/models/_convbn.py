"""ConvBNNet and ResNet (SCICO's `ConvBNNet` and `ResNet`) in Equinox."""

from collections.abc import Callable, Hashable, Sequence

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._validate import check_int
from ._blocks import ConvBNBlock
from ._init import glorot_normal
from ._layers import (
    _check_example,
    _pair,
    ChannelsLastBatchNorm,
    ChannelsLastConv2d,
)


def _build(
    depth: int,
    channels: int,
    num_filters: int,
    kernel_size: int | Sequence[int],
    strides: int | Sequence[int],
    act: Callable[[Array], Array],
    dtype,
    bn_axis_name: Hashable | Sequence[Hashable],
    key: PRNGKeyArray,
) -> tuple[tuple[ConvBNBlock, ...], ChannelsLastConv2d, ChannelsLastBatchNorm]:
    """The layers shared by ConvBNNet and ResNet: `depth - 1` conv-BN-act blocks,
    then a convolution back to `channels` channels and a batch norm."""
    depth = check_int("depth", depth)
    channels = check_int("channels", channels)
    num_filters = check_int("num_filters", num_filters)
    kernel_size = _pair(kernel_size, "kernel_size")
    strides = _pair(strides, "strides")
    keys = jax.random.split(key, depth)
    blocks = tuple(
        ConvBNBlock(
            channels if i == 0 else num_filters,
            num_filters,
            kernel_size=kernel_size,
            strides=strides,
            act=act,
            weight_init=glorot_normal,
            bn_axis_name=bn_axis_name,
            dtype=dtype,
            key=keys[i],
        )
        for i in range(depth - 1)
    )
    conv_end = ChannelsLastConv2d(
        num_filters if depth > 1 else channels,
        channels,
        kernel_size,
        strides,
        weight_init=glorot_normal,
        dtype=dtype,
        key=keys[-1],
    )
    norm_end = ChannelsLastBatchNorm(channels, bn_axis_name, dtype=dtype)
    return blocks, conv_end, norm_end


class ConvBNNet(eqx.Module):
    """Successive convolution + batch-norm blocks, as SCICO's `ConvBNNet`.

    `depth - 1` blocks of convolution (`num_filters` filters, circular padding,
    no bias), batch normalisation and activation, then a convolution back to
    `channels` channels followed by a batch normalisation (no activation). No
    residual connection. Weights are drawn as SCICO draws them (Flax's
    `xavier_normal()`: truncated normal, variance `2 / (fan_in + fan_out)`).

    Build it with `eqx.nn.make_with_state` and apply it per example under a
    `vmap` with `axis_name="batch"` (see `DnCNN`).
    """

    blocks: tuple[ConvBNBlock, ...]
    conv_end: ChannelsLastConv2d
    norm_end: ChannelsLastBatchNorm
    depth: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    num_filters: int = eqx.field(static=True)

    def __init__(
        self,
        depth: int,
        channels: int,
        num_filters: int = 64,
        kernel_size: int | Sequence[int] = (3, 3),
        strides: int | Sequence[int] = (1, 1),
        act: Callable[[Array], Array] = jax.nn.relu,
        dtype=None,
        *,
        bn_axis_name: Hashable | Sequence[Hashable] = "batch",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `depth`: the number of convolution layers (at least 1).
        - `channels`: the number of channels of the input (and output).
        - `num_filters`: the number of filters of the hidden layers.
        - `kernel_size`: the convolution kernel size.
        - `strides`: the convolution strides.
        - `act`: the activation function of the hidden blocks (SCICO: ReLU).
        - `dtype`: the dtype of the parameters and batch statistics (default
            `float32`).
        - `bn_axis_name`: the named axis (or axes) of the batch statistics:
            `"batch"` (per device) or `("device", "batch")` (across devices).
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        """
        self.blocks, self.conv_end, self.norm_end = _build(
            depth,
            channels,
            num_filters,
            kernel_size,
            strides,
            act,
            dtype,
            bn_axis_name,
            key,
        )
        self.depth = int(depth)  # validated by _build
        self.channels = int(channels)
        self.num_filters = int(num_filters)

    def __call__(
        self,
        x: Float[Array, "height width channels"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "height width channels"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one example of shape `(height, width, channels)`.
        - `state`: the `eqx.nn.State` with the batch-norm statistics.
        - `key`: ignored (the model is deterministic).

        **Returns:**

        The output, of the shape of `x`, and the updated state.
        """
        del key
        _check_example(x, self.channels, type(self).__name__)
        for block in self.blocks:
            x, state = block(x, state)
        return self.norm_end(self.conv_end(x), state)


class ResNet(ConvBNNet):
    """Convolution + batch-norm blocks with a residual connection, as SCICO's
    `ResNet`.

    The layers of `ConvBNNet` (`depth - 1` convolution, batch-norm, activation
    blocks, then a convolution back to `channels` channels and a batch norm),
    with the input added to the output: `y = x + net(x)`. Same constructor
    arguments as `ConvBNNet`; weights are drawn as SCICO draws them (Flax's
    `xavier_normal()`).

    Build it with `eqx.nn.make_with_state` and apply it per example under a
    `vmap` with `axis_name="batch"` (see `DnCNN`).
    """

    def __call__(
        self,
        x: Float[Array, "height width channels"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "height width channels"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one example of shape `(height, width, channels)`.
        - `state`: the `eqx.nn.State` with the batch-norm statistics.
        - `key`: ignored (the model is deterministic).

        **Returns:**

        The output, of the shape of `x`, and the updated state.
        """
        del key
        y, state = super().__call__(x, state)
        return x + y, state

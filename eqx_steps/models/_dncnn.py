"""DnCNN (SCICO's `DnCNNNet`) in Equinox."""

from collections.abc import Callable, Hashable, Sequence

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._validate import check_int
from ._blocks import ConvBNBlock
from ._init import he_normal
from ._layers import (
    _check_example,
    _pair,
    ChannelsLastConv2d,
)


class DnCNN(eqx.Module):
    """The DnCNN denoiser of Zhang et al. (2017), as SCICO's `DnCNNNet`.

    `depth` convolution layers with `num_filters` filters, circular padding and
    no bias: a first convolution with activation, `depth - 2` blocks of
    convolution, batch normalisation and activation, and a last convolution back
    to `channels` channels whose output, the estimated noise, is subtracted from
    the input (`y = x - net(x)`). Weights are drawn as SCICO draws them (Flax's
    `kaiming_normal()`: truncated normal with variance `2 / fan_in`).

    The model is stateful (batch norm): build it with `eqx.nn.make_with_state`
    and apply it per example under a `vmap` with `axis_name="batch"`.

    !!! example

        ```python
        model, state = eqx.nn.make_with_state(DnCNN)(
            depth=6, channels=1, num_filters=64, key=jax.random.key(0)
        )
        y, state = jax.vmap(
            model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, state)  # x: (N, H, W, 1)
        ```
    """

    conv_start: ChannelsLastConv2d
    blocks: tuple[ConvBNBlock, ...]
    conv_end: ChannelsLastConv2d
    depth: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    num_filters: int = eqx.field(static=True)
    act: Callable[[Array], Array] = eqx.field(static=True)

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

        - `depth`: the number of convolution layers (at least 2).
        - `channels`: the number of channels of the input (and output).
        - `num_filters`: the number of filters of the hidden layers.
        - `kernel_size`: the convolution kernel size.
        - `strides`: the convolution strides; anything but `(1, 1)` changes the
            spatial size, which the residual connection does not allow.
        - `act`: the activation function.
        - `dtype`: the dtype of the parameters and batch statistics (default
            `float32`).
        - `bn_axis_name`: the named axis (or axes) of the batch statistics:
            `"batch"` (per device) or `("device", "batch")` (across devices).
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        """
        depth = check_int("depth", depth, minimum=2)
        channels = check_int("channels", channels)
        num_filters = check_int("num_filters", num_filters)
        kernel_size = _pair(kernel_size, "kernel_size")
        strides = _pair(strides, "strides")
        keys = jax.random.split(key, depth)
        self.conv_start = ChannelsLastConv2d(
            channels,
            num_filters,
            kernel_size,
            strides,
            weight_init=he_normal,
            dtype=dtype,
            key=keys[0],
        )
        self.blocks = tuple(
            ConvBNBlock(
                num_filters,
                num_filters,
                kernel_size=kernel_size,
                strides=strides,
                act=act,
                weight_init=he_normal,
                bn_axis_name=bn_axis_name,
                dtype=dtype,
                key=k,
            )
            for k in keys[1:-1]
        )
        self.conv_end = ChannelsLastConv2d(
            num_filters,
            channels,
            kernel_size,
            strides,
            weight_init=he_normal,
            dtype=dtype,
            key=keys[-1],
        )
        self.depth = depth
        self.channels = channels
        self.num_filters = num_filters
        self.act = act

    def __call__(
        self,
        x: Float[Array, "height width channels"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "height width channels"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one noisy example of shape `(height, width, channels)`.
        - `state`: the `eqx.nn.State` with the batch-norm statistics.
        - `key`: ignored (the model is deterministic).

        **Returns:**

        The denoised example, of the shape of `x`, and the updated state.
        """
        del key
        _check_example(x, self.channels, "DnCNN")
        y = self.act(self.conv_start(x))
        for block in self.blocks:
            y, state = block(y, state)
        return x - self.conv_end(y), state

"""The building blocks of SCICO's models (`scico.flax.blocks`), in Equinox.

Each block takes one channels-last example and an `eqx.nn.State` and returns
`(y, state)`.
"""

from collections.abc import Callable, Hashable, Sequence

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from ._init import Initializer, lecun_normal
from ._layers import (
    ChannelsLastBatchNorm,
    ChannelsLastConv2d,
    max_pool,
    upscale_nn,
)


class ConvBNBlock(eqx.Module):
    """Convolution, batch normalisation, activation (SCICO's `ConvBNBlock`)."""

    conv: ChannelsLastConv2d
    norm: ChannelsLastBatchNorm
    act: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        *,
        kernel_size: int | Sequence[int] = (3, 3),
        strides: int | Sequence[int] = (1, 1),
        act: Callable[[Array], Array] = jax.nn.relu,
        weight_init: Initializer = lecun_normal,
        bn_axis_name: Hashable | Sequence[Hashable] = "batch",
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`: the number of input channels.
        - `num_filters`: the number of filters, i.e. of output channels.
        - `kernel_size`, `strides`: of the convolution.
        - `act`: the activation function.
        - `weight_init`: the convolution's initialiser.
        - `bn_axis_name`: the named axis (or axes) of the batch statistics.
        - `dtype`: the dtype of the parameters and running statistics.
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        """
        self.conv = ChannelsLastConv2d(
            in_channels,
            num_filters,
            kernel_size,
            strides,
            weight_init=weight_init,
            dtype=dtype,
            key=key,
        )
        self.norm = ChannelsLastBatchNorm(num_filters, bn_axis_name, dtype=dtype)
        self.act = act

    def __call__(
        self, x: Float[Array, "height width in_channels"], state: eqx.nn.State
    ) -> tuple[Float[Array, "height width num_filters"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one example of shape `(height, width, in_channels)`.
        - `state`: the `eqx.nn.State` with the batch norm's statistics.

        **Returns:**

        `act(norm(conv(x)))` and the updated state.
        """
        y, state = self.norm(self.conv(x), state)
        return self.act(y), state


class ConvBNPoolBlock(eqx.Module):
    """Convolution, batch normalisation, activation, pooling (SCICO's
    `ConvBNPoolBlock`).

    The pooling is `pool(y, window_shape)`, by default max pooling with strides
    equal to the window and `"SAME"` padding, as SCICO's U-Net uses.
    """

    block: ConvBNBlock
    window_shape: tuple[int, int] = eqx.field(static=True)
    pool: Callable[..., Array] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        *,
        window_shape: tuple[int, int] = (2, 2),
        pool: Callable[..., Array] = max_pool,
        key: PRNGKeyArray,
        **block_kwargs,
    ):
        """**Arguments:**

        - `in_channels`, `num_filters`: as for `ConvBNBlock`.
        - `window_shape`: the pooling window (and strides).
        - `pool`: `pool(x, window_shape) -> x` on one channels-last example.
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        - `**block_kwargs`: the other keyword arguments of `ConvBNBlock`.
        """
        self.block = ConvBNBlock(in_channels, num_filters, key=key, **block_kwargs)
        self.window_shape = window_shape
        self.pool = pool

    def __call__(
        self, x: Float[Array, "height width in_channels"], state: eqx.nn.State
    ) -> tuple[Float[Array, "new_height new_width num_filters"], eqx.nn.State]:
        """`pool(act(norm(conv(x))))` and the updated state."""
        y, state = self.block(x, state)
        return self.pool(y, self.window_shape), state


class ConvBNUpsampleBlock(eqx.Module):
    """Convolution, batch normalisation, activation, upsampling (SCICO's
    `ConvBNUpsampleBlock`); the upsampling is nearest-neighbour by `scale`."""

    block: ConvBNBlock
    scale: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        num_filters: int,
        *,
        scale: int = 2,
        key: PRNGKeyArray,
        **block_kwargs,
    ):
        """**Arguments:**

        - `in_channels`, `num_filters`: as for `ConvBNBlock`.
        - `scale`: the integer upsampling factor.
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        - `**block_kwargs`: the other keyword arguments of `ConvBNBlock`.
        """
        self.block = ConvBNBlock(in_channels, num_filters, key=key, **block_kwargs)
        self.scale = scale

    def __call__(
        self, x: Float[Array, "height width in_channels"], state: eqx.nn.State
    ) -> tuple[Float[Array, "new_height new_width num_filters"], eqx.nn.State]:
        """`upscale_nn(act(norm(conv(x))), scale)` and the updated state."""
        y, state = self.block(x, state)
        return upscale_nn(y, self.scale), state


class ConvBNMultiBlock(eqx.Module):
    """`num_blocks` successive `ConvBNBlock`s, each with its own parameters
    (SCICO's `ConvBNMultiBlock`)."""

    blocks: tuple[ConvBNBlock, ...]

    def __init__(
        self,
        num_blocks: int,
        in_channels: int,
        num_filters: int,
        *,
        key: PRNGKeyArray,
        **block_kwargs,
    ):
        """**Arguments:**

        - `num_blocks`: the number of blocks.
        - `in_channels`: the input channels of the first block.
        - `num_filters`: the output channels of every block.
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        - `**block_kwargs`: the other keyword arguments of `ConvBNBlock`.
        """
        keys = jax.random.split(key, num_blocks)
        self.blocks = tuple(
            ConvBNBlock(
                in_channels if i == 0 else num_filters,
                num_filters,
                key=keys[i],
                **block_kwargs,
            )
            for i in range(num_blocks)
        )

    def __call__(
        self, x: Float[Array, "height width in_channels"], state: eqx.nn.State
    ) -> tuple[Float[Array, "height width num_filters"], eqx.nn.State]:
        """The blocks applied in turn, and the updated state."""
        for block in self.blocks:
            x, state = block(x, state)
        return x, state

"""U-Net (SCICO's `UNet`) in Equinox."""

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._validate import check_int
from ._blocks import ConvBNMultiBlock, ConvBNPoolBlock, ConvBNUpsampleBlock
from ._init import he_normal
from ._layers import (
    _check_example,
    _pair,
    ChannelsLastConv2d,
)


class UNet(eqx.Module):
    """The U-Net of Ronneberger et al. (2015), as SCICO's `UNet`.

    - In: `block_depth` convolution, batch-norm, activation blocks with
        `num_filters` filters.
    - Down, `depth - 1` levels: a block followed by max pooling (window and
        strides `window_shape`, `"SAME"` padding), then `block_depth` blocks;
        level `i = 1, 2, ...` has `2**i * num_filters` filters.
    - Up, `depth - 1` levels: a block followed by nearest-neighbour upsampling
        by `upsampling`, concatenation with the input of the matching down
        level (skip connection, the skip first), then `block_depth` blocks;
        each level halves the number of filters, back to `num_filters`.
    - Out: a 1x1 convolution to `channels` channels (no activation).

    All convolutions have circular padding, no bias and weights drawn as SCICO
    draws them (Flax's `kaiming_normal()`). The skip connections need each
    pooling to be undone by the upsampling: with the defaults, the input height
    and width must be divisible by `2**(depth - 1)`.

    Build it with `eqx.nn.make_with_state` and apply it per example under a
    `vmap` with `axis_name="batch"` (see `DnCNN`).
    """

    block_in: ConvBNMultiBlock
    down: tuple[ConvBNPoolBlock, ...]
    down_blocks: tuple[ConvBNMultiBlock, ...]
    up: tuple[ConvBNUpsampleBlock, ...]
    up_blocks: tuple[ConvBNMultiBlock, ...]
    conv_out: ChannelsLastConv2d
    depth: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    num_filters: int = eqx.field(static=True)
    block_depth: int = eqx.field(static=True)
    window_shape: tuple[int, int] = eqx.field(static=True)
    upsampling: int = eqx.field(static=True)

    def __init__(
        self,
        depth: int,
        channels: int,
        num_filters: int = 64,
        kernel_size: int | Sequence[int] = (3, 3),
        strides: int | Sequence[int] = (1, 1),
        block_depth: int = 2,
        window_shape: int | Sequence[int] = (2, 2),
        upsampling: int = 2,
        act: Callable[[Array], Array] = jax.nn.relu,
        dtype=None,
        *,
        bn_axis_name: Hashable | Sequence[Hashable] = "batch",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `depth`: the number of levels, at least 1 (1: no pooling at all).
        - `channels`: the number of channels of the input (and output).
        - `num_filters`: the number of filters of the first level.
        - `kernel_size`: the convolution kernel size (the last convolution is
            always 1x1).
        - `strides`: the convolution strides; anything but `(1, 1)` changes the
            spatial sizes, which the skip connections do not allow.
        - `block_depth`: the number of blocks after each pooling/upsampling.
        - `window_shape`: the max-pooling window (and strides).
        - `upsampling`: the nearest-neighbour upsampling factor; it must undo the
            pooling: `window_shape == (upsampling, upsampling)`.
        - `act`: the activation function (SCICO: ReLU).
        - `dtype`: the dtype of the parameters and batch statistics (default
            `float32`).
        - `bn_axis_name`: the named axis (or axes) of the batch statistics:
            `"batch"` (per device) or `("device", "batch")` (across devices).
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        """
        depth = check_int("depth", depth)
        channels = check_int("channels", channels)
        num_filters = check_int("num_filters", num_filters)
        block_depth = check_int("block_depth", block_depth)
        upsampling = check_int("upsampling", upsampling)
        window = _pair(window_shape, "window_shape")
        strides = _pair(strides, "strides")
        if depth > 1 and window != (upsampling, upsampling):
            raise ValueError(
                f"`window_shape` must be (upsampling, upsampling) = "
                f"{(upsampling, upsampling)} so that the upsampling undoes the "
                f"pooling for the skip connections; got window_shape={window_shape!r}"
                f" and upsampling={upsampling}."
            )
        block_kwargs: dict[str, Any] = dict(
            kernel_size=_pair(kernel_size, "kernel_size"),
            strides=strides,
            act=act,
            weight_init=he_normal,
            bn_axis_name=bn_axis_name,
            dtype=dtype,
        )
        keys = iter(jax.random.split(key, 2 + 4 * (depth - 1)))

        self.block_in = ConvBNMultiBlock(
            block_depth, channels, num_filters, key=next(keys), **block_kwargs
        )
        down, down_blocks = [], []
        c = num_filters
        for level in range(1, depth):
            filters = 2**level * num_filters
            down.append(
                ConvBNPoolBlock(
                    c, filters, window_shape=window, key=next(keys), **block_kwargs
                )
            )
            down_blocks.append(
                ConvBNMultiBlock(
                    block_depth, filters, filters, key=next(keys), **block_kwargs
                )
            )
            c = filters
        up, up_blocks = [], []
        for level in reversed(range(depth - 1)):
            filters = 2**level * num_filters
            up.append(
                ConvBNUpsampleBlock(
                    c, filters, scale=upsampling, key=next(keys), **block_kwargs
                )
            )
            # The skip connection brings as many channels as the upsampled path.
            up_blocks.append(
                ConvBNMultiBlock(
                    block_depth, 2 * filters, filters, key=next(keys), **block_kwargs
                )
            )
            c = filters
        self.down, self.down_blocks = tuple(down), tuple(down_blocks)
        self.up, self.up_blocks = tuple(up), tuple(up_blocks)
        self.conv_out = ChannelsLastConv2d(
            num_filters,
            channels,
            (1, 1),
            strides,
            weight_init=he_normal,
            dtype=dtype,
            key=next(keys),
        )
        self.depth = depth
        self.channels = channels
        self.num_filters = num_filters
        self.block_depth = block_depth
        self.window_shape = window
        self.upsampling = upsampling

    def _check_spatial(self, shape: tuple[int, ...]) -> None:
        sizes = [tuple(shape[:2])]
        for _ in range(self.depth - 1):
            sizes.append(
                tuple(math.ceil(n / w) for n, w in zip(sizes[-1], self.window_shape))
            )
        for skip, low in zip(sizes[:-1], sizes[1:]):
            if tuple(n * self.upsampling for n in low) != skip:
                raise ValueError(
                    f"UNet(depth={self.depth}, window_shape={self.window_shape}, "
                    f"upsampling={self.upsampling}) cannot take `x` of shape "
                    f"{tuple(shape)}: pooling (height, width) = {skip} gives {low}, "
                    f"which upsampling does not bring back to {skip} for the skip "
                    "connection. Use a height and width divisible by "
                    f"window_shape**(depth - 1) = "
                    f"{tuple(w ** (self.depth - 1) for w in self.window_shape)}."
                )

    def __call__(
        self,
        x: Float[Array, "height width channels"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "height width channels"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one example of shape `(height, width, channels)`; the height and
            width must be divisible by `window_shape**(depth - 1)`.
        - `state`: the `eqx.nn.State` with the batch-norm statistics.
        - `key`: ignored (the model is deterministic).

        **Returns:**

        The output, of the shape of `x`, and the updated state.
        """
        del key
        _check_example(x, self.channels, "UNet")
        self._check_spatial(x.shape)
        x, state = self.block_in(x, state)
        skips = []
        for pool_block, blocks in zip(self.down, self.down_blocks):
            skips.append(x)
            x, state = pool_block(x, state)
            x, state = blocks(x, state)
        for up_block, blocks in zip(self.up, self.up_blocks):
            x, state = up_block(x, state)
            x = jnp.concatenate((skips.pop(), x), axis=-1)
            x, state = blocks(x, state)
        return self.conv_out(x), state

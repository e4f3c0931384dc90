"""Channels-last layers: a convolution, a batch norm, pooling and upsampling.

The reference models take one example of shape `(height, width, channels)`, as
SCICO's Flax models do for a batch `(N, H, W, C)`. The layers here keep that
layout all the way through, so that under the library's per-example
`jax.vmap(..., axis_name="batch")` the batch folds into the `N` of one NHWC
convolution and no transposes are needed between layers.
"""

from collections.abc import Hashable, Sequence
from typing import Literal

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._validate import check_int, is_int
from ._batch_norm import batch_moments, normalise, scale_shift
from ._init import default_floating_dtype, Initializer, lecun_normal, make_weight


_NP_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect", "REPLICATE": "edge"}


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a pair of positive ints."""
    if is_int(value):
        pair = (int(value), int(value))  # pyright: ignore[reportArgumentType]
    elif isinstance(value, Sequence) and len(value) == 2 and all(map(is_int, value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"`{name}` must be an int or a pair of ints, got {value!r}.")
    if min(pair) < 1:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")
    return pair


class ChannelsLastConv2d(eqx.nn.Conv):
    """A 2-D convolution of one channels-last example, initialised as in Flax.

    A subclass of `equinox.nn.Conv` (so anything that handles Equinox
    convolutions, such as `eqx_steps.spectral_normalization_conv`, handles it):
    the weight is stored `(out_channels, in_channels, kh, kw)` as Equinox keeps
    it, but the input and output are `(height, width, channels)`, as in Flax's
    `nn.Conv` and SCICO's models. The convolution is one
    `lax.conv_general_dilated` with dimension numbers `("NHWC", "OIHW", "NHWC")`,
    so that under an outer `jax.vmap` the batch becomes its `N`.

    Padding follows Flax's `padding="CIRCULAR"`: each spatial axis is padded by
    `(k - 1) // 2` before and `k // 2` after (kernel size `k`), so a stride of 1
    keeps the spatial size. By default there is no bias, as in SCICO's models,
    and the weight is drawn from Flax's default `nn.Conv` initialiser (LeCun
    normal); when `use_bias=True` the bias starts at zero, as in Flax.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = (3, 3),
        stride: int | Sequence[int] = (1, 1),
        *,
        use_bias: bool = False,
        padding_mode: Literal["CIRCULAR", "ZEROS", "REFLECT", "REPLICATE"] = "CIRCULAR",
        weight_init: Initializer = lecun_normal,
        dtype=None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`: the number of input channels (the last input axis).
        - `out_channels`: the number of output channels (filters).
        - `kernel_size`: the kernel's `(kh, kw)`, or one int for both.
        - `stride`: the convolution's strides, or one int for both.
        - `use_bias`: whether to add a (zero-initialised) bias.
        - `padding_mode`: `"CIRCULAR"` (default, SCICO's choice), `"ZEROS"`,
            `"REFLECT"` or `"REPLICATE"`; the amount is always Flax's `"SAME"`-like
            `((k - 1) // 2, k // 2)`.
        - `weight_init`: `init(key, shape, dtype)` for the `(out, in, kh, kw)`
            weight, e.g. [`eqx_steps.models.he_normal`][] (SCICO's `kaiming_normal()`)
            or [`eqx_steps.models.glorot_normal`][] (SCICO's `xavier_normal()`).
            Defaults to Flax's default, LeCun normal.
        - `dtype`: the dtype of the parameters; defaults to `float32` (or
            `float64` with 64-bit JAX).
        - `key`: a `jax.random.PRNGKey` for the initialisation. (Keyword only.)
        """
        in_channels = check_int("in_channels", in_channels)
        out_channels = check_int("out_channels", out_channels)
        kernel = _pair(kernel_size, "kernel_size")
        strides = _pair(stride, "stride")
        mode = str(padding_mode).upper()
        if mode not in ("CIRCULAR", "ZEROS", "REFLECT", "REPLICATE"):
            raise ValueError(
                "`padding_mode` must be 'CIRCULAR', 'ZEROS', 'REFLECT' or "
                f"'REPLICATE', got {padding_mode!r}."
            )
        # The fields of `eqx.nn.Conv`, set here rather than by its `__init__`,
        # which would draw (and compile, per shape) a weight only to discard it.
        # (Equinox raises at construction if a future version adds a field.)
        dtype = default_floating_dtype() if dtype is None else dtype
        shape = (out_channels, in_channels, *kernel)
        self.weight = make_weight(weight_init, key, shape, dtype)
        self.bias = jnp.zeros((out_channels, 1, 1), dtype) if use_bias else None
        self.num_spatial_dims = 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel
        self.stride = strides
        self.padding = tuple(((k - 1) // 2, k // 2) for k in kernel)
        self.dilation = (1, 1)
        self.groups = 1
        self.use_bias = use_bias
        self.padding_mode = mode

    def __call__(
        self,
        x: Float[Array, "height width in_channels"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "new_height new_width out_channels"]:
        """**Arguments:**

        - `x`: one example of shape `(height, width, in_channels)`.
        - `key`: ignored; accepted for compatibility with the Equinox API.

        **Returns:**

        An array of shape `(new_height, new_width, out_channels)`; with stride
        1, `(height, width, out_channels)`.
        """
        del key
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects one channels-last example of shape "
                f"(height, width, {self.in_channels}); got `x` of shape {x.shape}. "
                "Apply it per example (e.g. under jax.vmap) with the channels last."
            )
        assert not isinstance(self.padding, str)
        pads = list(self.padding)
        if self.padding_mode == "ZEROS":
            lax_padding: str | Sequence[tuple[int, int]] = pads
        else:
            x = jnp.pad(x, pads + [(0, 0)], mode=_NP_PAD_MODES[self.padding_mode])
            lax_padding = "VALID"
        y = lax.conv_general_dilated(
            x[None],
            self.weight,
            window_strides=self.stride,
            padding=lax_padding,
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
        )[0]
        if self.bias is not None:
            y = y + self.bias.reshape(-1)
        return y


class ChannelsLastBatchNorm(eqx.nn.BatchNorm):
    """`equinox.nn.BatchNorm` for channels-last input `(..., channels)`.

    Equinox's batch norm (same parameters `weight` and `bias`, same running
    statistics in the `eqx.nn.State`, same `inference` flag for
    `equinox.nn.inference_mode`, same zero-debiased running statistics in
    inference) with the channel axis last, as in Flax's `nn.BatchNorm`.
    Statistics are computed over the spatial axes and over the named batch axis
    `axis_name`.

    The defaults are SCICO's (`momentum=0.99`, `eps=1e-5`) and `mode="batch"`,
    which normalises by the batch statistics in training as Flax does (both modes
    work in every backend of the parallel steps).

    With `fast_variance=True` (the default, as Flax's `use_fast_variance`) the
    batch variance is computed in one pass as `E[x**2] - E[x]**2` (clipped at
    0), which is what SCICO's Flax models compute and about 5% faster for a
    DnCNN training step on CPU; `fast_variance=False` gives Equinox's two-pass
    `E[(x - E[x])**2]`, more accurate when the mean is large compared with the
    standard deviation.

    In `mode="batch"` the layer states its own derivative (for real inputs):
    the same values as automatic differentiation, from two reductions of the
    cotangent per layer instead of four, which makes SCICO's DnCNN training
    step ~13% faster on CPU (see the performance page).
    """

    fast_variance: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] = "batch",
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype=None,
        mode: Literal["ema", "batch"] = "batch",
        *,
        fast_variance: bool = True,
    ):
        """**Arguments:**

        - `input_size`: the number of channels (the last input axis).
        - `axis_name`: the named `vmap`/`pmap` axis (or axes) to compute the
            statistics over: `"batch"` for per-device statistics under the
            library's per-example `vmap`, `("device", "batch")` for statistics
            synchronised across devices.
        - `eps`, `channelwise_affine`, `momentum`, `inference`, `dtype`, `mode`:
            as for `equinox.nn.BatchNorm`.
        - `fast_variance`: compute the batch variance in one pass, as Flax does
            (`mode="batch"` only; `mode="ema"` is Equinox's code unchanged).
        """
        self.fast_variance = fast_variance
        super().__init__(
            input_size,
            axis_name,
            eps=eps,
            channelwise_affine=channelwise_affine,
            momentum=momentum,
            inference=inference,
            dtype=dtype,
            mode=mode,
        )

    def __call__(
        self,
        x: Float[Array, "*spatial channels"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
    ) -> tuple[Float[Array, "*spatial channels"], eqx.nn.State]:
        """**Arguments:**

        - `x`: an array of shape `(..., input_size)`.
        - `state`: the `eqx.nn.State` holding the running statistics.
        - `key`: ignored.
        - `inference`: overrides `self.inference` when not `None`.

        **Returns:**

        The normalised array, of the shape of `x`, and the updated state.
        """
        if self.mode != "batch":
            # Equinox's own code, on its channels-first layout.
            y, state = super().__call__(
                jnp.moveaxis(x, -1, 0), state, key=key, inference=inference
            )
            return jnp.moveaxis(y, 0, -1), state
        # mode="batch": Equinox's computation, written for the channels last.
        # (Moving the axis around Equinox's code instead leaves ~4 transposes of
        # the activations per layer in the compiled training step.)
        assert self.batch_counter is not None
        assert self.batch_state_index is not None
        if inference is None:
            inference = self.inference
        counter = state.get(self.batch_counter)
        hidden_mean, hidden_var = state.get(self.batch_state_index)
        if self.weight is None or self.bias is None:
            weight, bias = (
                jnp.ones(x.shape[-1], x.dtype),
                jnp.zeros(x.shape[-1], x.dtype),
            )
        else:
            weight, bias = self.weight, self.bias
        if inference:
            # Equinox's zero-debiasing of the running statistics.
            scale = jnp.where(counter == 0, 1, 1 - self.momentum**counter)
            mean, var = hidden_mean / scale, hidden_var / scale
            return scale_shift(x, mean, var, self.eps, weight, bias), state
        if jnp.iscomplexobj(x):  # the hand-written gradient is for real inputs
            mean, var = batch_moments(x, self.axis_name, self.fast_variance)
            y = scale_shift(x, mean, var, self.eps, weight, bias)
        else:
            y, mean, var = normalise(
                x, weight, bias, self.eps, self.axis_name, self.fast_variance
            )
            mean, var = lax.stop_gradient((mean, var))
        state = state.set(self.batch_counter, counter + 1)
        state = state.set(
            self.batch_state_index,
            (
                hidden_mean * self.momentum + mean * (1 - self.momentum),
                hidden_var * self.momentum + var * (1 - self.momentum),
            ),
        )
        return y, state


def max_pool(
    x: Float[Array, "height width channels"], window_shape: tuple[int, int]
) -> Float[Array, "new_height new_width channels"]:
    """Max pooling of one channels-last example, as Flax's
    `max_pool(x, window_shape, strides=window_shape, padding="SAME")`.

    **Arguments:**

    - `x`: an array of shape `(height, width, channels)`.
    - `window_shape`: the pooling window, also used as the strides.

    **Returns:**

    An array of shape `(ceil(height / wh), ceil(width / ww), channels)`.
    """
    window = (*window_shape, 1)
    # A Python scalar init value, as in Flax: reduce_window is differentiable then.
    return lax.reduce_window(x, -jnp.inf, lax.max, window, window, "SAME")


def upscale_nn(
    x: Float[Array, "height width channels"], scale: int = 2
) -> Float[Array, "scale*height scale*width channels"]:
    """Nearest-neighbour upscaling of one channels-last example (SCICO's
    `upscale_nn`).

    **Arguments:**

    - `x`: an array of shape `(height, width, channels)`.
    - `scale`: the integer upscaling factor.

    **Returns:**

    An array of shape `(scale * height, scale * width, channels)`.
    """
    h, w, c = x.shape
    y = jnp.broadcast_to(x[:, None, :, None, :], (h, scale, w, scale, c))
    return y.reshape(h * scale, w * scale, c)


def _check_example(x: Array, channels: int, model: str) -> None:
    """Raise a ValueError unless `x` is one `(height, width, channels)` example."""
    if x.ndim != 3 or x.shape[-1] != channels:
        raise ValueError(
            f"{model} expects one channels-last example of shape (height, width, "
            f"{channels}); got `x` of shape {x.shape}. Apply it per example, e.g. "
            "with `jax.vmap(model, axis_name='batch', in_axes=(0, None), "
            "out_axes=(0, None))` (what `eqx_steps.per_example` does)."
        )

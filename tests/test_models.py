"""Tests of the reference models and their channels-last layers."""

import functools
import math

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose
from hypothesis import given, settings

from eqx_steps.models import (
    ChannelsLastBatchNorm,
    ChannelsLastConv2d,
    ConvBNNet,
    DnCNN,
    max_pool,
    ResNet,
    UNet,
    upscale_nn,
)


# ---------------------------------------------------------------------------
# Helpers: the library's per-example application, module-level jitted steps.

OPT = optax.adam(1e-2)


def per_example(model, state, x):
    return jax.vmap(
        lambda xi, s: model(xi, s),
        axis_name="batch",
        in_axes=(0, None),
        out_axes=(0, None),
    )(x, state)


@eqx.filter_jit
def train_step(model, state, opt_state, x, target):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(p):
        y, new_state = per_example(eqx.combine(p, static), state, x)
        return jnp.mean((y - target) ** 2), (y, new_state)

    (loss, (y, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), new_state, opt_state, loss, y


@eqx.filter_jit
def forward(model, state, x):
    """Training-mode and inference-mode outputs, and the states after each."""
    y_train, state_train = per_example(model, clone(state), x)
    y_infer, state_infer = per_example(eqx.nn.inference_mode(model), state, x)
    return y_train, state_train, y_infer, state_infer


def clone(state):
    """A usable copy of an `eqx.nn.State` (using one twice raises)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def n_floats(tree) -> int:
    """The number of floating-point entries of the arrays (or shapes) in `tree`."""
    return sum(
        math.prod(x.shape)
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    )


def build(cls, **kwargs):
    return eqx.nn.make_with_state(cls)(**kwargs, key=jax.random.key(0))


# ---------------------------------------------------------------------------
# Parameter and batch-statistic counts equal SCICO's Flax models.

COUNTS = [
    (DnCNN, dict(depth=6, channels=1, num_filters=64), 149_120, 512),
    (DnCNN, dict(depth=17, channels=1, num_filters=64), 556_032, 1_920),
    (ConvBNNet, dict(depth=3, channels=1, num_filters=16), 2_658, 66),
    (ResNet, dict(depth=3, channels=1, num_filters=16), 2_658, 66),
    (UNet, dict(depth=2, channels=1, num_filters=8), 9_472, 176),
    (UNet, dict(depth=4, channels=3, num_filters=16), 730_624, 2_080),
]


@pytest.mark.parametrize(
    "cls, kwargs, params, stats",
    COUNTS,
    ids=[f"{c.__name__}-{k['depth']}-{k['num_filters']}" for c, k, _, _ in COUNTS],
)
def test_counts_equal_scico(cls, kwargs, params, stats):
    # Shapes only: nothing is drawn or compiled.
    model, state = eqx.filter_eval_shape(
        eqx.nn.make_with_state(cls), **kwargs, key=jax.random.key(0)
    )
    assert n_floats(model) == params
    assert n_floats(state) == stats  # the int counters are not statistics


@pytest.mark.parametrize(
    "cls, kwargs, size",
    [
        (DnCNN, dict(depth=17, channels=1, num_filters=64), (40, 40)),
        (ConvBNNet, dict(depth=5, channels=3, num_filters=16), (17, 9)),
        (ResNet, dict(depth=5, channels=3, num_filters=16), (17, 9)),
        (UNet, dict(depth=4, channels=3, num_filters=16), (64, 40)),
    ],
)
def test_forward_shapes_of_large_models(cls, kwargs, size):
    # Traced abstractly (nothing compiled), in training and inference mode.
    def build_and_apply(inference):
        model, state = eqx.nn.make_with_state(cls)(**kwargs, key=jax.random.key(0))
        if inference:
            model = eqx.nn.inference_mode(model)
        x = jnp.zeros((2, *size, kwargs["channels"]))
        return per_example(model, state, x)

    for inference in (False, True):
        y, state = eqx.filter_eval_shape(build_and_apply, inference)
        assert y.shape == (2, *size, kwargs["channels"])


# ---------------------------------------------------------------------------
# Small models: forward in train and inference mode, gradient steps, sizes.

# Small enough to compile quickly; the full-size wiring is checked abstractly by
# `test_forward_shapes_of_large_models`.
SMALL = {
    "dncnn": (DnCNN, dict(depth=3, channels=1, num_filters=8)),
    "convbn": (ConvBNNet, dict(depth=2, channels=2, num_filters=8)),
    "resnet": (ResNet, dict(depth=2, channels=1, num_filters=8)),
    "unet": (UNet, dict(depth=2, channels=1, num_filters=8)),
}
# Two spatial sizes: training steps on the first, forward passes in training and
# inference mode on the second (the U-Net's, depth 2, must be even).
SIZES = [(16, 16), (8, 12)]


@functools.cache
def small(name):
    cls, kwargs = SMALL[name]
    return build(cls, **kwargs)


def batch(name, size, n=4, seed=0):
    channels = SMALL[name][1]["channels"]
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (n, *size, channels))
    return x, x + 0.1 * jax.random.normal(kt, x.shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_gradient_steps(name):
    model, state = small(name)
    x, target = batch(name, SIZES[0])
    opt_state = OPT.init(eqx.filter(model, eqx.is_inexact_array))
    new_model, new_state, opt_state, loss, y = train_step(
        model, clone(state), opt_state, x, target
    )
    assert y.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(y)))
    assert np.isfinite(float(loss))
    # Every parameter moves (Adam's first step is +-lr wherever grad != 0).
    for old, new in zip(
        jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)),
        jax.tree.leaves(eqx.filter(new_model, eqx.is_inexact_array)),
    ):
        assert old.shape == new.shape
        assert not np.allclose(old, new)
    # The running statistics moved from their initial (0, 1).
    assert not tree_allclose(clone(state), new_state)
    # A few more steps on the same batch lower the loss.
    losses = [float(loss)]
    for _ in range(4):
        new_model, new_state, opt_state, loss, _ = train_step(
            new_model, new_state, opt_state, x, target
        )
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_inference_mode(name):
    # Statistics from a training step at one size, forward at another size.
    model, state = small(name)
    x0, target = batch(name, SIZES[0])
    opt_state = OPT.init(eqx.filter(model, eqx.is_inexact_array))
    _, trained, *_ = train_step(model, clone(state), opt_state, x0, target)
    x, _ = batch(name, SIZES[1])
    y_train, state_train, y1, state1 = forward(model, clone(trained), x)
    _, _, y2, _ = forward(model, clone(trained), x)
    for y in (y_train, y1):
        assert y.shape == x.shape
        assert bool(jnp.all(jnp.isfinite(y)))
    assert not tree_allclose(state_train, clone(trained))  # training updates it
    assert tree_allclose(state1, clone(trained))  # inference does not
    np.testing.assert_array_equal(y1, y2)  # deterministic
    assert not np.allclose(y1, y_train, atol=1e-4)  # running vs batch statistics
    # Inference is per example: an example's output does not depend on the others.
    other, _ = batch(name, SIZES[1], seed=1)
    _, _, y3, _ = forward(model, clone(trained), x.at[1:].set(other[1:]))
    np.testing.assert_allclose(y3[0], y1[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_convbnnet_output_is_batch_normalised():
    # ConvBNNet ends with a batch norm (scale 1, bias 0 at init): in training mode
    # each output channel has zero mean and unit variance over batch and space.
    model, state = small("convbn")
    x, target = batch("convbn", SIZES[0])
    opt_state = OPT.init(eqx.filter(model, eqx.is_inexact_array))
    *_, y = train_step(model, clone(state), opt_state, x, target)
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)


@pytest.mark.slow
def test_residual_connections():
    x, _ = batch("dncnn", SIZES[1])
    # DnCNN: y = x - net(x); a zero last convolution gives the identity.
    model, state = small("dncnn")
    model = eqx.tree_at(lambda m: m.conv_end.weight, model, replace_fn=jnp.zeros_like)
    *_, y, _ = forward(model, clone(state), x)
    np.testing.assert_allclose(y, x, atol=1e-6)
    # ResNet: y = x + net(x); a zero last batch-norm scale and bias gives x.
    model, state = small("resnet")
    model = eqx.tree_at(
        lambda m: (m.norm_end.weight, m.norm_end.bias),
        model,
        replace_fn=jnp.zeros_like,
    )
    *_, y, _ = forward(model, clone(state), x)
    np.testing.assert_allclose(y, x, atol=1e-6)


@pytest.mark.slow
def test_cross_device_batch_statistics():
    # bn_axis_name=("device", "batch") under pmap(vmap) gives the statistics of
    # the whole global batch, i.e. what a single vmap over all examples gives.
    kwargs = dict(depth=2, channels=1, num_filters=8)
    model, state = build(ConvBNNet, **kwargs)
    model_dev, state_dev = build(ConvBNNet, **kwargs, bn_axis_name=("device", "batch"))
    weights = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    weights_dev = jax.tree.leaves(eqx.filter(model_dev, eqx.is_array))
    for a, b in zip(weights, weights_dev, strict=True):
        np.testing.assert_array_equal(a, b)  # same weights, only the axis differs
    x = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))
    y, new_state = eqx.filter_jit(per_example)(model, state, x)

    n_dev = jax.local_device_count()

    @eqx.filter_pmap(axis_name="device", in_axes=(None, None, 0), out_axes=(0, None))
    def on_devices(m, s, xs):
        return per_example(m, s, xs)

    y_dev, new_state_dev = on_devices(
        model_dev, state_dev, x.reshape(n_dev, -1, *x.shape[1:])
    )
    np.testing.assert_allclose(y_dev.reshape(x.shape), y, rtol=1e-5, atol=1e-5)
    assert tree_allclose(new_state_dev, new_state, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Initialisation: SCICO's initialisers.


def _check_truncated_normal(w, variance, rtol=0.1):
    std = math.sqrt(variance)
    assert abs(float(jnp.std(w)) / std - 1) < rtol
    # jax's truncated normal is cut at two (pre-rescaling) standard deviations.
    assert float(jnp.max(jnp.abs(w))) <= 2 * std / 0.87962566 + 1e-6


@pytest.mark.slow
def test_initialisers():
    # Variances that tell the three apart: LeCun 1 / fan_in, He (kaiming) 2 / fan_in,
    # Glorot (xavier) 2 / (fan_in + fan_out).
    conv = ChannelsLastConv2d(8, 8, key=jax.random.key(0))
    assert conv.bias is None and conv.weight.shape == (8, 8, 3, 3)
    _check_truncated_normal(conv.weight, 1 / (8 * 9))  # Flax's default
    model, _ = small("dncnn")
    _check_truncated_normal(model.blocks[0].conv.weight, 2 / (8 * 9))  # SCICO: He
    model, _ = small("convbn")  # 2 -> 8 channels; SCICO: Glorot
    _check_truncated_normal(model.blocks[0].conv.weight, 2 / (2 * 9 + 8 * 9), 0.15)
    model, _ = small("unet")
    _check_truncated_normal(model.down_blocks[0].blocks[0].conv.weight, 2 / (16 * 9))
    norm = model.block_in.blocks[0].norm
    assert isinstance(norm, eqx.nn.BatchNorm) and norm.mode == "batch"
    assert (norm.momentum, norm.eps, norm.axis_name) == (0.99, 1e-5, "batch")
    np.testing.assert_array_equal(norm.weight, 1.0)
    np.testing.assert_array_equal(norm.bias, 0.0)


# ---------------------------------------------------------------------------
# The channels-last layers against Equinox's channels-first ones.


def _none(x):
    return x is None


@eqx.filter_jit
def _both_convs(conv, reference, x):
    return conv(x), jnp.moveaxis(reference(jnp.moveaxis(x, -1, 0)), 0, -1)


@settings(max_examples=6)
@given(
    in_channels=st.sampled_from([1, 3]),
    out_channels=st.sampled_from([2, 4]),
    kernel_size=st.sampled_from([(3, 3), (1, 1), (3, 2), (4, 4)]),
    stride=st.sampled_from([1, 2]),
    padding_mode=st.sampled_from(["CIRCULAR", "ZEROS", "REFLECT", "REPLICATE"]),
    use_bias=st.booleans(),
)
def test_conv_matches_equinox_conv2d(
    in_channels, out_channels, kernel_size, stride, padding_mode, use_bias
):
    # Layers built abstractly (no initialisation to compile), weights set by hand.
    conv = eqx.filter_eval_shape(
        ChannelsLastConv2d,
        in_channels,
        out_channels,
        kernel_size,
        stride,
        use_bias=use_bias,
        padding_mode=padding_mode,
        key=jax.random.key(1),
    )
    assert isinstance(conv, eqx.nn.Conv)
    assert conv.weight.shape == (out_channels, in_channels, *kernel_size)
    reference = eqx.filter_eval_shape(
        eqx.nn.Conv2d,
        in_channels,
        out_channels,
        kernel_size,
        stride,
        padding=[((k - 1) // 2, k // 2) for k in kernel_size],
        use_bias=use_bias,
        padding_mode=padding_mode,
        key=jax.random.key(2),
    )
    rng = np.random.default_rng(0)
    weight = jnp.asarray(rng.normal(size=conv.weight.shape), jnp.float32)
    bias = jnp.arange(1.0, out_channels + 1.0).reshape(-1, 1, 1) if use_bias else None
    conv, reference = (
        eqx.tree_at(lambda c: (c.weight, c.bias), layer, (weight, bias), is_leaf=_none)
        for layer in (conv, reference)
    )
    x = jnp.asarray(rng.normal(size=(7, 6, in_channels)), jnp.float32)
    y, y_ref = _both_convs(conv, reference, x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    if stride == 1:
        assert y.shape == (7, 6, out_channels)


def test_circular_padding_is_periodic():
    # Circular padding makes the convolution commute with circular shifts.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 2)).astype(np.float32)
    shifted = np.roll(x, (3, -2), axis=(0, 1))
    conv = eqx.filter_eval_shape(ChannelsLastConv2d, 2, 3, key=jax.random.key(0))
    weight = jnp.asarray(rng.normal(size=(3, 2, 3, 3)), jnp.float32)
    conv = eqx.tree_at(lambda c: c.weight, conv, weight)
    y, y_shifted = eqx.filter_jit(eqx.filter_vmap(conv))(np.stack([x, shifted]))
    np.testing.assert_allclose(y_shifted, np.roll(y, (3, -2), axis=(0, 1)), atol=1e-5)


@eqx.filter_jit
def _norm_steps(norm, state, x):
    """Two training steps, then inference, per example: outputs and final state."""
    vm = functools.partial(
        jax.vmap, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )
    y1, state = vm(norm)(x, state)
    y2, state = vm(norm)(2 * x + 1, state)
    y3, state = vm(eqx.nn.inference_mode(norm))(x, state)
    return (y1, y2, y3), state


@pytest.mark.parametrize(
    "mode, fast_variance", [("batch", False), ("batch", True), ("ema", True)]
)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_equinox(mode, fast_variance, affine):
    # Channels-last input, the same results as Equinox's channels-first layer
    # (with Flax's one-pass variance, equal up to rounding).
    kwargs = dict(momentum=0.9, channelwise_affine=affine, mode=mode)
    norm = ChannelsLastBatchNorm(3, **kwargs, fast_variance=fast_variance)
    norm_ref = eqx.nn.BatchNorm(3, "batch", **kwargs)
    if affine:
        w, b = jnp.array([0.5, 1.0, 2.0]), jnp.array([0.0, -1.0, 3.0])
        norm, norm_ref = (
            eqx.tree_at(lambda n: (n.weight, n.bias), n, (w, b))
            for n in (norm, norm_ref)
        )
    x = jax.random.normal(jax.random.key(0), (5, 4, 6, 3)) * 2 + 1
    ys, state = _norm_steps(norm, eqx.nn.State(norm), x)
    ys_ref, state_ref = _norm_steps(
        norm_ref, eqx.nn.State(norm_ref), jnp.moveaxis(x, -1, 1)
    )
    for y, y_ref in zip(ys, ys_ref):
        np.testing.assert_allclose(y, jnp.moveaxis(y_ref, 1, -1), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("fast_variance", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("devices", [1, 2])
def test_batch_norm_gradients_match_equinox(fast_variance, affine, devices):
    # The layer's own gradient (two reductions per layer instead of five) equals
    # automatic differentiation of Equinox's batch norm: with respect to the
    # input, the weight and the bias, with the statistics over the examples of a
    # device or synchronised over devices too.
    axis = "batch" if devices == 1 else ("device", "batch")
    kwargs = dict(momentum=0.9, channelwise_affine=affine, mode="batch")
    norm = ChannelsLastBatchNorm(3, axis, **kwargs, fast_variance=fast_variance)
    norm_ref = eqx.nn.BatchNorm(3, axis, **kwargs)
    if affine:
        w, b = jnp.array([0.5, 1.0, 2.0]), jnp.array([0.0, -1.0, 3.0])
        norm, norm_ref = (
            eqx.tree_at(lambda n: (n.weight, n.bias), n, (w, b))
            for n in (norm, norm_ref)
        )
    x = jax.random.normal(jax.random.key(0), (devices, 5, 4, 6, 3)) * 2 + 1
    ct = jax.random.normal(jax.random.key(1), x.shape)

    def loss(nx, channels_last):
        norm, x = nx
        state = eqx.nn.State(norm)
        x = x if channels_last else jnp.moveaxis(x, -1, 2)
        per_device = jax.vmap(lambda e: norm(e, state)[0], axis_name="batch")
        y = jax.vmap(per_device, axis_name="device")(x)  # a named axis of devices
        y = y if channels_last else jnp.moveaxis(y, 2, -1)
        return jnp.sum(jnp.sin(y) * ct)

    grad = eqx.filter_grad(loss)
    got, want = grad((norm, x), True), grad((norm_ref, x), False)
    leaves = lambda g: [g[1], g[0].weight, g[0].bias]  # noqa: E731
    for a, b in zip(leaves(got), leaves(want), strict=True):
        if a is None:
            assert b is None
            continue
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=5)
@given(
    h=st.sampled_from([1, 3]),
    w=st.sampled_from([2, 5]),
    c=st.sampled_from([1, 3]),
    scale=st.sampled_from([2, 3]),
)
def test_pool_undoes_nearest_upscaling(h, w, c, scale):
    rng = np.random.default_rng(h * 100 + w * 10 + c)
    x = rng.normal(size=(h, w, c)).astype(np.float32)
    up = upscale_nn(jnp.asarray(x), scale)
    assert up.shape == (h * scale, w * scale, c)
    np.testing.assert_array_equal(up[::scale, ::scale], x)
    np.testing.assert_array_equal(max_pool(up, (scale, scale)), x)


# ---------------------------------------------------------------------------
# Errors name the argument, the value and the fix.


def test_bad_inputs_raise():
    model, state = small("unet")
    with pytest.raises(ValueError, match=r"\(9, 10, 1\).*divisible by .*\(2, 2\)"):
        per_example(model, state, jnp.zeros((2, 9, 10, 1)))
    with pytest.raises(ValueError, match=r"\(height, width, 1\).*\(16, 16, 3\)"):
        per_example(model, state, jnp.zeros((2, 16, 16, 3)))
    model, state = small("dncnn")
    with pytest.raises(ValueError, match=r"one channels-last example"):
        model(jnp.zeros((2, 8, 8, 1)), state)
    with pytest.raises(ValueError, match=r"`depth` must be an int >= 2, got 1"):
        build(DnCNN, depth=1, channels=1)
    with pytest.raises(ValueError, match=r"`num_filters` must be an int >= 1, got 0"):
        build(ResNet, depth=2, channels=1, num_filters=0)
    with pytest.raises(
        ValueError, match=r"`kernel_size` must be positive, got \(3, 0\)"
    ):
        build(UNet, depth=2, channels=1, kernel_size=(3, 0))
    with pytest.raises(
        ValueError,
        match=r"`window_shape` must be .*\(3, 3\).*got window_shape=\(2, 2\)",
    ):
        build(UNet, depth=2, channels=1, window_shape=(2, 2), upsampling=3)
    with pytest.raises(ValueError, match=r"`padding_mode` must be .*got 'wrap'"):
        ChannelsLastConv2d(1, 1, padding_mode="wrap", key=jax.random.key(0))  # pyright: ignore

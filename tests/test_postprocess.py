"""Tests of the post-processors: traversals, clipping, spectral normalisation."""

import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from helpers import tree_allclose, tree_equal
from hypothesis import given, strategies as st
from jaxtyping import Array, Float, Int

import eqx_steps as es
from eqx_steps import (
    clip_positive,
    clip_range,
    construct_traversal,
    estimate_spectral_norm,
    exact_spectral_norm,
    path_to_str,
    spectral_normalization_conv,
)


class _Net(eqx.Module):
    conv: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    alpha: Float[Array, "2"]
    count: Int[Array, ""]
    extra: dict[str, Array]
    act: Callable
    size: int = eqx.field(static=True)

    def __init__(self, seed: int):
        k = jax.random.split(jax.random.key(seed), 6)
        self.conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=k[0])
        self.conv2 = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k[1])
        self.linear = eqx.nn.Linear(4, 2, key=k[2])
        self.norm = eqx.nn.LayerNorm(3)
        # random norm parameters, so that clipping has something to do
        self.norm = eqx.tree_at(
            lambda n: (n.weight, n.bias),
            self.norm,
            tuple(jax.random.normal(k[5], (2, 3))),
        )
        # scale the weights up so that clipping has something to do
        self.conv = eqx.tree_at(lambda c: c.weight, self.conv, 2 * self.conv.weight)
        self.alpha = jax.random.normal(k[3], (2,))
        self.count = jnp.array(-5, jnp.int32)
        self.extra = {"scale": jax.random.normal(k[4], (3,))}
        self.act = jax.nn.relu
        self.size = 8


NAMES = [
    "weight",
    "kernel",
    "bias",
    "alpha",
    "conv",
    "conv/",
    "/conv",
    "count",
    "scale",
    "",
    "nope",
]


# Names that select no floating-point leaf of _Net ("count" is an integer leaf).
_SELECTS_NOTHING = ("count", "nope")

# SCICO's names on _Net: Flax's "kernel" (conv and dense weights), "scale" (norm
# weights) and "bias"; every other name is a substring of the path.
_SCICO_SELECTS = {
    "kernel": {"/conv/weight", "/conv2/weight", "/linear/weight"},
    "scale": {"/norm/weight"},
    "bias": {"/conv/bias", "/conv2/bias", "/linear/bias", "/norm/bias"},
}


def _selected(prmname, path, leaf):
    name = "/" + jtu.keystr(path, simple=True, separator="/")
    if prmname in _SCICO_SELECTS:
        return name in _SCICO_SELECTS[prmname]
    return eqx.is_inexact_array(leaf) and prmname in name


def _check_clipped(model, out, prmname, lo, hi):
    """Selected leaves are np.clip'ed, every other leaf is the very same object."""

    def is_none(x):
        return x is None

    assert jtu.tree_structure(model, is_leaf=is_none) == jtu.tree_structure(
        out, is_leaf=is_none
    )
    before = jtu.tree_flatten_with_path(model, is_leaf=is_none)[0]
    after = jtu.tree_leaves(out, is_leaf=is_none)
    n_selected = 0
    for (path, a), b in zip(before, after):
        if _selected(prmname, path, a):
            n_selected += 1
            assert b.dtype == a.dtype and b.shape == a.shape
            dtype_lo = None if lo is None else np.asarray(lo, a.dtype)
            dtype_hi = None if hi is None else np.asarray(hi, a.dtype)
            np.testing.assert_array_equal(b, np.clip(a, dtype_lo, dtype_hi))
            assert dtype_lo is None or np.all(np.asarray(b) >= dtype_lo)
            assert dtype_hi is None or np.all(np.asarray(b) <= dtype_hi)
        else:
            assert b is a, path_to_str(path)
    return n_selected


def test_construct_traversal_paths():
    net = _Net(0)
    paths = {
        path_to_str(p)
        for p, leaf in jtu.tree_flatten_with_path(net)[0]
        if construct_traversal("")(p, leaf)
    }
    # every float array leaf, by "/"-joined names with Flax's leading "/";
    # the int leaf, the activation function and the static field are never selected
    assert paths == {
        "/conv/weight",
        "/conv/bias",
        "/conv2/weight",
        "/conv2/bias",
        "/linear/weight",
        "/linear/bias",
        "/norm/weight",
        "/norm/bias",
        "/alpha",
        "/extra/scale",
    }
    mlp = eqx.nn.MLP(2, 2, 4, 1, key=jax.random.key(0))
    trav = construct_traversal("layers/0/")
    chosen = [
        path_to_str(p) for p, x in jtu.tree_flatten_with_path(mlp)[0] if trav(p, x)
    ]
    assert chosen == ["/layers/0/weight", "/layers/0/bias"]
    # equal and hashable by name: rebuilding a traversal does not retrace
    assert construct_traversal("weight") == construct_traversal("weight")
    assert hash(construct_traversal("weight")) == hash(construct_traversal("weight"))


# --- SCICO's parameter names on stock layers and the bundled models ----------


def _touched(model, prmname):
    """The leaves `clip_positive(model, construct_traversal(prmname))` changes, by
    identity (a huge lower bound changes every leaf it touches)."""
    out = clip_positive(model, construct_traversal(prmname), minval=1e6)
    return {
        id(a)
        for a, b in zip(jtu.tree_leaves(model), jtu.tree_leaves(out))
        if b is not a
    }


def _fields(model, kinds, name):
    """The ids of the `name` leaves of the layers of type `kinds` in `model`."""
    layers = jtu.tree_leaves(model, is_leaf=lambda x: isinstance(x, kinds))
    return {
        id(getattr(m, name))
        for m in layers
        if isinstance(m, kinds) and getattr(m, name, None) is not None
    }


_CONVS = (eqx.nn.Conv, eqx.nn.ConvTranspose)
_KERNELS = (*_CONVS, eqx.nn.Linear)
_NORMS = (eqx.nn.BatchNorm, eqx.nn.LayerNorm, eqx.nn.GroupNorm)
_BIASED = (*_KERNELS, *_NORMS)


class _StockNet(eqx.Module):
    conv: eqx.nn.Conv2d
    convt: eqx.nn.ConvTranspose2d
    bn: eqx.nn.BatchNorm
    ln: eqx.nn.LayerNorm
    gn: eqx.nn.GroupNorm
    mlp: eqx.nn.MLP
    emb: eqx.nn.Embedding
    alpha: Array

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.conv = eqx.nn.Conv2d(2, 4, 3, key=k[0])
        self.convt = eqx.nn.ConvTranspose2d(4, 2, 3, key=k[1])
        self.bn = eqx.nn.BatchNorm(4, "batch", mode="batch")
        self.ln = eqx.nn.LayerNorm(4)
        self.gn = eqx.nn.GroupNorm(2, 4)
        self.mlp = eqx.nn.MLP(4, 2, 3, 1, key=k[2])
        self.emb = eqx.nn.Embedding(5, 2, key=k[3])
        self.alpha = jnp.ones(2)


@pytest.mark.slow
def test_scico_names_on_stock_equinox_layers():
    model, _ = eqx.nn.make_with_state(_StockNet)(jax.random.key(0))
    kernels = _fields(model, _KERNELS, "weight")
    scales = _fields(model, _NORMS, "weight")
    biases = _fields(model, _BIASED, "bias")
    assert len(kernels) == 4 and len(scales) == 3 and len(biases) == 7
    assert _touched(model, "kernel") == kernels  # not the norms' nor the embedding's
    assert _touched(model, "scale") == scales
    assert _touched(model, "bias") == biases
    # other names: a path substring, as before
    everything = kernels | scales | {id(model.emb.weight)}
    assert _touched(model, "weight") == everything
    assert _touched(model, "mlp/") == _fields(
        model.mlp, eqx.nn.Linear, "weight"
    ) | _fields(model.mlp, eqx.nn.Linear, "bias")
    # spectral normalisation with SCICO's "kernel" touches the convolutions only
    out = spectral_normalization_conv(model, construct_traversal("kernel"), (8, 8, 2))
    changed = {
        id(a)
        for a, b in zip(jtu.tree_leaves(model), jtu.tree_leaves(out))
        if b is not a
    }
    assert changed == _fields(model, _CONVS, "weight")


def test_scico_traversal_called_directly_needs_the_layer():
    kernel = construct_traversal("kernel")
    path = (jtu.GetAttrKey("conv"), jtu.GetAttrKey("weight"))
    w = jnp.ones((2, 2, 3, 3))
    assert kernel(path, w, owner=eqx.nn.Conv2d)
    assert not kernel(path, w, owner=eqx.nn.LayerNorm)
    assert construct_traversal("scale")(path, w, owner=eqx.nn.GroupNorm)
    with pytest.raises(TypeError, match=r"construct_traversal\('kernel'\).*owner="):
        kernel(path, w)
    assert construct_traversal("bias")((jtu.GetAttrKey("bias"),), jnp.ones(2))


def _small(cls, **kwargs):
    return eqx.nn.make_with_state(cls)(**kwargs, key=jax.random.key(0))[0]


@pytest.mark.parametrize(
    "model, n_convs",
    [
        (_small(es.models.DnCNN, depth=4, channels=1, num_filters=4), 4),
        (_small(es.models.ConvBNNet, depth=2, channels=1, num_filters=4), None),
        (_small(es.models.ResNet, depth=3, channels=1, num_filters=4), None),
        (_small(es.models.UNet, depth=2, channels=1, num_filters=4), None),
    ],
    ids=["dncnn", "convbnnet", "resnet", "unet"],
)
def test_scico_names_on_the_bundled_models(model, n_convs):
    # SCICO's models have convolutions ("kernel"), BatchNorms ("scale", "bias")
    # and, where SCICO gives them one, convolution biases.
    kernels = _fields(model, _CONVS, "weight")
    scales = _fields(model, eqx.nn.BatchNorm, "weight")
    assert kernels and scales
    assert n_convs is None or len(kernels) == n_convs  # DnCNN: `depth` convolutions
    assert _touched(model, "kernel") == kernels
    assert _touched(model, "scale") == scales
    assert _touched(model, "bias") == _fields(model, _BIASED, "bias")
    assert not _touched(model, "kernel") & _touched(model, "scale")


@given(
    prmname=st.sampled_from(NAMES),
    lo=st.floats(-2, 1),
    width=st.floats(0, 2),
    seed=st.integers(0, 2**16),
    filtered=st.booleans(),
)
def test_clip_range_property(prmname, lo, width, seed, filtered):
    model = _Net(seed)
    if filtered:  # the trainable partition the steps pass: None for the rest
        model = eqx.filter(model, eqx.is_inexact_array)
    hi = lo + width
    if prmname in _SELECTS_NOTHING:
        with pytest.raises(ValueError, match="selects no leaf"):
            clip_range(model, construct_traversal(prmname), minval=lo, maxval=hi)
        return
    out = clip_range(model, construct_traversal(prmname), minval=lo, maxval=hi)
    n = _check_clipped(model, out, prmname, lo, hi)
    assert n > 0
    assert out.size == model.size  # static field


@given(
    prmname=st.sampled_from(NAMES),
    minval=st.floats(1e-6, 1),
    seed=st.integers(0, 2**16),
    filtered=st.booleans(),
)
def test_clip_positive_property(prmname, minval, seed, filtered):
    model = _Net(seed)
    if filtered:
        model = eqx.filter(model, eqx.is_inexact_array)
    if prmname in _SELECTS_NOTHING:
        with pytest.raises(ValueError, match="selects no leaf"):
            clip_positive(model, construct_traversal(prmname), minval=minval)
        return
    out = clip_positive(model, construct_traversal(prmname), minval=minval)
    assert _check_clipped(model, out, prmname, minval, None) > 0


def test_clip_defaults_are_scicos():
    model = _Net(1)
    out = clip_positive(model, construct_traversal("alpha"))
    assert float(jnp.min(out.alpha)) >= np.float32(1e-4)
    out = clip_range(model, construct_traversal("weight"))
    for w in (out.conv.weight, out.conv2.weight, out.linear.weight):
        assert float(jnp.min(w)) >= np.float32(1e-4) and float(jnp.max(w)) <= 1.0


def test_clip_preserves_low_precision_dtypes():
    tree = {"w": jnp.linspace(-2, 2, 9, dtype=jnp.bfloat16), "n": jnp.arange(3)}
    out = clip_range(tree, construct_traversal("w"), jnp.float32(-0.5), 0.5)
    assert out["w"].dtype == jnp.bfloat16
    assert out["n"] is tree["n"]
    np.testing.assert_array_equal(
        np.asarray(out["w"], np.float32).clip(-0.5, 0.5), out["w"]
    )


@eqx.filter_jit
def _jit_clip_range(model, traversal, lo, hi):
    return clip_range(model, traversal, lo, hi)


@given(prmname=st.sampled_from(["weight", "alpha"]), seed=st.integers(0, 2**16))
def test_clip_under_jit_with_traced_bounds(prmname, seed):
    model = _Net(seed)
    lo, hi = jnp.float32(-0.3), jnp.float32(0.2)
    got = _jit_clip_range(model, construct_traversal(prmname), lo, hi)
    want = clip_range(model, construct_traversal(prmname), lo, hi)
    assert tree_equal(got, want)


_TRAV_W = construct_traversal("weight")
_TRAV_A = construct_traversal("alpha")
_XSHAPE = (8, 8, 2)


def _post(model):
    model = clip_positive(model, _TRAV_A, minval=0.1)
    model = clip_range(model, construct_traversal("bias"), -0.05, 0.05)
    return spectral_normalization_conv(model, _TRAV_W, _XSHAPE)


_pmap_post = eqx.filter_pmap(_post, axis_name="device")
_jit_post = eqx.filter_jit(_post)


@pytest.mark.slow
def test_post_processors_under_jit_and_filter_pmap():
    n = jax.local_device_count()
    nets = [eqx.filter(_Net(s), eqx.is_inexact_array) for s in range(n)]
    stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *nets)
    out = _pmap_post(stacked)
    # (eager equals jit for the clips in test_clip_under_jit_with_traced_bounds)
    for i, net in enumerate(nets):
        got_i = jtu.tree_map(lambda x: x[i], out)
        assert tree_allclose(got_i, _jit_post(net), rtol=1e-5, atol=1e-6)
        assert got_i.count is None and got_i.act is None
        assert float(jnp.min(got_i.alpha)) >= np.float32(0.1)
        assert float(jnp.max(jnp.abs(got_i.conv.bias))) <= np.float32(0.05)


# --- spectral normalisation ------------------------------------------------


def _circular_operator(conv):
    """The conv's operator with Equinox's own circular SAME padding, stride 1."""
    w = conv.weight
    n = w.ndim - 2
    cls = {1: eqx.nn.Conv1d, 2: eqx.nn.Conv2d, 3: eqx.nn.Conv3d}[n]
    op = cls(
        w.shape[1] * conv.groups,
        w.shape[0],
        w.shape[2:],
        padding="SAME",
        padding_mode="CIRCULAR",
        dilation=conv.dilation,
        groups=conv.groups,
        use_bias=False,
        key=jax.random.key(0),
    )
    return eqx.tree_at(lambda c: c.weight, op, w)


def _exact_norm(conv, spatial):
    return float(
        exact_spectral_norm(
            _circular_operator(conv), (conv.weight.shape[1] * conv.groups, *spatial)
        )
    )


@pytest.mark.slow
def test_spectral_normalization_brings_norms_to_1_over_1_02():
    net = _Net(3)
    out = spectral_normalization_conv(net, _TRAV_W, (1, 8, 8, 2), n_steps=100)
    for conv in (out.conv, out.conv2):
        np.testing.assert_allclose(_exact_norm(conv, (8, 8)), 1 / 1.02, rtol=0.02)

    # biases, the Linear weight (not a convolution) and everything else unchanged
    def unchanged(m):
        return (m.conv.bias, m.conv2.bias, m.linear, m.norm, m.alpha, m.count, m.extra)

    assert tree_equal(unchanged(out), unchanged(net))
    assert out.act is net.act and out.size == net.size


@pytest.mark.parametrize(
    "conv",
    [
        eqx.nn.Conv2d(4, 4, 3, dilation=2, groups=2, key=jax.random.key(1)),
        eqx.nn.Conv1d(2, 3, 5, key=jax.random.key(2)),
        eqx.nn.ConvTranspose2d(3, 2, 3, key=jax.random.key(3)),
    ],
    ids=["dilated-grouped-2d", "1d", "transpose-2d"],
)
def test_spectral_normalization_other_convs(conv):
    n = conv.weight.ndim - 2
    spatial = (8,) * n
    out = spectral_normalization_conv(
        {"layer": conv}, _TRAV_W, (*spatial, 7), n_steps=100
    )
    np.testing.assert_allclose(_exact_norm(out["layer"], spatial), 1 / 1.02, rtol=0.02)


def test_spectral_normalization_default_steps_never_undershoots():
    # power iteration approaches the norm from below, so the normalised norm is
    # >= 1 / 1.02; with SCICO's 10 steps it may overshoot by several percent
    net = _Net(4)
    out = spectral_normalization_conv(net, construct_traversal("conv2"), _XSHAPE)
    assert tree_equal(out.conv, net.conv)
    assert _exact_norm(out.conv2, (8, 8)) >= (1 / 1.02) * (1 - 1e-4)


def test_spectral_normalization_ignores_batch_and_channels_of_xshape():
    net = _Net(5)
    a = spectral_normalization_conv(net, _TRAV_W, (8, 8, 2))
    b = spectral_normalization_conv(net, _TRAV_W, (1, 8, 8, 17))
    c = spectral_normalization_conv(net, _TRAV_W, (6, 8, 8, 1))
    assert tree_equal(a, b) and tree_equal(a, c)


def test_spectral_normalization_skips_non_trainable_and_zero_weights():
    net = _Net(6)
    spec = jtu.tree_map(eqx.is_inexact_array, net)
    spec = eqx.tree_at(lambda m: m.conv.weight, spec, False)
    params = eqx.filter(net, spec)
    out = spectral_normalization_conv(params, _TRAV_W, _XSHAPE)
    assert out.conv.weight is None
    assert not tree_equal(out.conv2.weight, params.conv2.weight)
    zero = eqx.tree_at(lambda m: m.conv.weight, net, jnp.zeros_like(net.conv.weight))
    out = spectral_normalization_conv(zero, construct_traversal("conv/"), _XSHAPE)
    assert jnp.all(out.conv.weight == 0)  # SCICO would give NaN


# --- spectral norm estimation ---------------------------------------------


def _scico_estimate(f, input_shape, seed=0, n_steps=10, eps=1e-12):
    """scico 0.0.7 scico/flax/train/spectral.py estimate_spectral_norm, verbatim."""

    def normalize(x):
        return x * jax.lax.rsqrt((x**2).sum() + eps)

    u0 = jax.random.normal(jax.random.PRNGKey(seed), input_shape)
    v0 = jnp.zeros_like(f(u0))

    def fun(carry, _):
        u, v = carry
        v, f_vjp = jax.vjp(f, u)
        v = normalize(v)
        (u,) = f_vjp(v)
        u = normalize(u)
        return (u, v), None

    (u, v), _ = jax.lax.scan(fun, (u0, v0), xs=None, length=n_steps)
    return jnp.vdot(v, f(u))


@functools.partial(jax.jit, static_argnames=("n_steps", "seed"))
def _estimate_matrix(a, n_steps, seed=0):
    return estimate_spectral_norm(
        lambda x: a @ x, (a.shape[1],), seed=seed, n_steps=n_steps
    )


@functools.partial(jax.jit, static_argnames=("n_steps", "seed"))
def _scico_estimate_matrix(a, n_steps, seed=0):
    return _scico_estimate(lambda x: a @ x, (a.shape[1],), seed=seed, n_steps=n_steps)


@jax.jit
def _exact_matrix(a):
    return exact_spectral_norm(lambda x: a @ x, (a.shape[1],))


@given(
    shape=st.sampled_from([(6, 5), (3, 8)]),
    seed=st.integers(0, 2**31 - 1),
    n_steps=st.sampled_from([1, 10]),
)
def test_estimate_matches_scico_and_never_exceeds_exact(shape, seed, n_steps):
    a = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    est = _estimate_matrix(a, n_steps)
    exact = _exact_matrix(a)
    np.testing.assert_allclose(
        exact, np.linalg.norm(np.asarray(a, np.float64), 2), rtol=1e-5
    )
    np.testing.assert_allclose(est, _scico_estimate_matrix(a, n_steps), rtol=1e-6)
    assert est <= exact * (1 + 1e-5)


@given(
    shape=st.sampled_from([(6, 5), (3, 8), (16, 16)]), seed=st.integers(0, 2**31 - 1)
)
def test_estimate_converges_to_exact(shape, seed):
    a = jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
    np.testing.assert_allclose(_estimate_matrix(a, 200), _exact_matrix(a), rtol=2e-3)


def test_estimate_on_random_maps_with_default_steps():
    # small random Gaussian maps: 10 steps are within a few percent
    for seed in range(5):
        a = jnp.asarray(np.random.default_rng(seed).normal(size=(6, 5)), jnp.float32)
        np.testing.assert_allclose(_estimate_matrix(a, 10), _exact_matrix(a), rtol=0.03)


def test_exact_spectral_norm_of_a_convolution_and_a_diagonal():
    d = jnp.array([0.5, -3.0, 2.0])
    np.testing.assert_allclose(
        exact_spectral_norm(lambda x: d * x, (3,)), 3.0, rtol=1e-6
    )
    # a 1x1 identity-like circular conv on 2 channels has norm 1
    conv = eqx.nn.Conv2d(2, 2, 1, use_bias=False, key=jax.random.key(0))
    conv = eqx.tree_at(lambda c: c.weight, conv, jnp.eye(2)[:, :, None, None])
    np.testing.assert_allclose(exact_spectral_norm(conv, (2, 4, 4)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        estimate_spectral_norm(conv, (2, 4, 4), n_steps=3), 1.0, rtol=1e-5
    )


# --- errors ----------------------------------------------------------------


def test_bad_arguments_raise_naming_the_argument():
    net = _Net(0)
    with pytest.raises(TypeError, match="construct_traversal: `prmname`.*3"):
        construct_traversal(3)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="clip_positive: `traversal`.*'weight'"):
        clip_positive(net, "weight")  # pyright: ignore[reportArgumentType]
    with pytest.raises(
        ValueError, match=r"clip_range: `minval`=1\.0 is greater than `maxval`=0\.5"
    ):
        clip_range(net, _TRAV_W, 1.0, 0.5)
    with pytest.raises(TypeError, match="clip_range: `maxval` must be a real scalar"):
        clip_range(net, _TRAV_W, 0.0, "1")  # pyright: ignore[reportArgumentType]
    with pytest.raises(
        TypeError, match="clip_positive: `minval` must be a real scalar"
    ):
        clip_positive(net, _TRAV_W, jnp.zeros(3))
    with pytest.raises(ValueError, match="clip_positive: `minval` must not be NaN"):
        clip_positive(net, _TRAV_W, float("nan"))
    for minval in (0.0, -5e-4, jnp.float32(0.0)):
        with pytest.raises(
            ValueError, match=r"clip_positive: `minval`=.* is not positive.*clip_range"
        ):
            clip_positive(net, _TRAV_W, minval)
    with pytest.raises(
        ValueError,
        match=r"`xshape`=\(8, 8\) does not fit the 2-D convolution '/conv/weight'",
    ):
        spectral_normalization_conv(net, _TRAV_W, (8, 8))
    with pytest.raises(
        ValueError, match=r"spectral_normalization_conv: `xshape`.*\(8, -1, 2\)"
    ):
        spectral_normalization_conv(net, _TRAV_W, (8, -1, 2))
    with pytest.raises(ValueError, match=r"`n_steps` must be (an int )?>= 1, got 0"):
        spectral_normalization_conv(net, _TRAV_W, _XSHAPE, n_steps=0)
    with pytest.raises(TypeError, match="spectral_normalization_conv: `traversal`"):
        spectral_normalization_conv(net, None, _XSHAPE)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="estimate_spectral_norm: `input_shape`"):
        estimate_spectral_norm(lambda x: x, (0, 3))
    with pytest.raises(TypeError, match="exact_spectral_norm: `f`"):
        exact_spectral_norm(3, (2,))  # pyright: ignore[reportArgumentType]
    tree = {"z": jnp.ones(2, jnp.complex64)}
    with pytest.raises(
        ValueError, match="clip_positive: the traversal selects the complex leaf '/z'"
    ):
        clip_positive(tree, construct_traversal("z"))


# --- traversals that select nothing; iterate -------------------------------


@given(prmname=st.sampled_from(NAMES), filtered=st.booleans())
def test_iterate_lists_the_selected_leaves(prmname, filtered):
    model = _Net(3)
    if filtered:
        model = eqx.filter(model, eqx.is_inexact_array)
    got = construct_traversal(prmname).iterate(model)
    want = [
        leaf
        for path, leaf in jtu.tree_flatten_with_path(model)[0]
        if eqx.is_inexact_array(leaf) and _selected(prmname, path, leaf)
    ]
    assert len(got) == len(want) and all(a is b for a, b in zip(got, want))


def test_iterate_on_a_bundled_model_as_scico_tests_it():
    # SCICO's test_traversal: every "kernel" is 4-D, every "scale"/"bias" 1-D.
    model = es.models.ConvBNNet(
        depth=3, channels=1, num_filters=4, key=jax.random.key(0)
    )
    kernels = construct_traversal("kernel").iterate(model)
    assert len(kernels) == 3 and all(k.ndim == 4 for k in kernels)
    for name in ("scale", "bias"):
        leaves = construct_traversal(name).iterate(model)
        assert leaves and all(x.ndim == 1 for x in leaves)


def _post_lst_step(post):
    """A jitted train_step_post with one post-processor on a tiny model."""
    model = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    state = es.TrainState.create(model, optax.sgd(0.1))
    batch = {"image": jnp.ones((2, 2)), "label": -jnp.ones((2, 2))}
    step = eqx.filter_jit(
        functools.partial(
            es.train_step_post,
            learning_rate_fn=lambda step: 0.1,
            criterion=es.mse_loss,
            train_step_fn=es.train_step,
            metrics_fn=es.compute_metrics,
            post_lst=[post],
            axis_name=None,
        )
    )
    return step, state, batch


@pytest.mark.parametrize(
    "post, what",
    [
        (functools.partial(clip_positive, minval=0.5), "leaf"),
        (functools.partial(clip_range, minval=0.0, maxval=1.0), "leaf"),
        (
            functools.partial(spectral_normalization_conv, xshape=(4, 4, 1)),
            "convolution weight",
        ),
    ],
)
def test_a_traversal_that_selects_nothing_raises_naming_it(post, what):
    net = _Net(0)
    with pytest.raises(ValueError) as info:
        post(net, traversal=construct_traversal("lmdba"))
    msg = str(info.value)
    assert f"construct_traversal('lmdba') selects no {what}" in msg
    assert "'/conv/weight'" in msg and "in all" in msg


def test_a_misspelt_traversal_fails_the_step_once_at_trace_time():
    calls = []

    def trav(path, leaf):
        calls.append(path)
        return "lmdba" in path_to_str(path)

    post = functools.partial(clip_positive, traversal=trav, minval=0.5)
    step, state, batch = _post_lst_step(post)
    with pytest.raises(ValueError, match="selects no leaf.*'/weight', '/bias'"):
        step(state, batch)

    # One that selects something: the selection runs when the step is traced,
    # not at each step.
    def bias(path, leaf):
        calls.append(path)
        return path_to_str(path) == "/bias"

    post = functools.partial(clip_positive, traversal=bias, minval=0.5)
    step, state, batch = _post_lst_step(post)
    state, _ = step(state, batch)
    n_traced = len(calls)
    for _ in range(3):
        state, _ = step(state, batch)
    assert len(calls) == n_traced > 0
    assert float(jnp.min(state.model.bias)) >= 0.5

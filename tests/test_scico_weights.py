"""Tests of `load_scico_dncnn`: SCICO's pretrained DnCNN weights in `models.DnCNN`.

SCICO is not a dependency: the reference figures below are SCICO 0.0.7's own
outputs (`scico.denoiser.DnCNN(variant)`, jax 0.8.1, CPU) on `reference_input()`,
printed by `benchmarks/scico_dncnn_compare.py --print-reference`.
"""

import importlib.resources
import pathlib

import equinox as eqx
import hypothesis.strategies as st
import jax
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings

from eqx_steps.models import DnCNN, load_scico_dncnn, SCICO_DNCNN_VARIANTS


# SCICO's outputs on reference_input() (6N: with sigma = 0.1).
REFERENCE = {  # variant: (sum, sum of squares, pixels at PIXELS)
    "6L": (
        500.258893,
        270.194620,
        (0.177842020, 0.681485772, 0.720629334, 0.717389941),
    ),
    "6M": (
        497.401792,
        259.729171,
        (0.246604412, 0.624514937, 0.650359451, 0.635737955),
    ),
    "6H": (
        499.167488,
        251.573835,
        (0.435180217, 0.603173553, 0.530078470, 0.467322826),
    ),
    "6N": (
        502.274134,
        271.272390,
        (0.239802986, 0.674737274, 0.642792522, 0.655414760),
    ),
    "17M": (
        501.163090,
        270.987710,
        (0.245429456, 0.674640417, 0.638132333, 0.640851259),
    ),
}
PIXELS = ((0, 0), (5, 7), (16, 3), (31, 31))
ARCHITECTURE = {"6L": (6, 1), "6M": (6, 1), "6H": (6, 1), "6N": (6, 2), "17M": (17, 1)}


def reference_input() -> np.ndarray:
    """A deterministic 32x32 image (integer arithmetic: bit-identical everywhere);
    the same formula is in benchmarks/scico_dncnn_compare.py."""
    i, j = np.mgrid[:32, :32]
    clean = ((i * 3 + j * 5) % 64) / 64 * 0.6 + 0.2
    noise = ((i * i * 31 + j * 17 + i * j * 7) % 97) / 97 - 0.5
    return (clean + 0.2 * noise).astype(np.float32)


@eqx.filter_jit
def infer(model, state, x):
    return eqx.nn.inference_mode(model)(x, state)[0]


def model_input(variant: str) -> np.ndarray:
    x = reference_input()[..., None]
    if variant == "6N":  # SCICO's noise-level input: [x, sigma]
        x = np.concatenate([x, np.full_like(x, 0.1)], -1)
    return x


# ---------------------------------------------------------------------------
# The shipped variants reproduce SCICO.


def test_variants_are_the_shipped_files():
    assert SCICO_DNCNN_VARIANTS == tuple(REFERENCE)
    data = importlib.resources.files("eqx_steps.models") / "scico_dncnn"
    assert "BSD 3-Clause" in (data / "LICENSE").read_text()
    for v in SCICO_DNCNN_VARIANTS:
        assert (data / f"dncnn{v}.mpk").is_file()


@pytest.mark.parametrize("variant", SCICO_DNCNN_VARIANTS)
def test_shipped_variant_reproduces_scico(variant):
    model, state = load_scico_dncnn(variant)
    depth, channels = ARCHITECTURE[variant]
    assert isinstance(model, DnCNN)
    assert (model.depth, model.channels, model.num_filters) == (depth, channels, 64)
    y = np.asarray(infer(model, state, model_input(variant)), np.float64)
    assert y.shape == (32, 32, channels)
    y = y[..., 0]  # SCICO keeps the first output channel of 6N
    total, total_sq, pixels = REFERENCE[variant]
    np.testing.assert_allclose(y.sum(), total, rtol=1e-5)
    np.testing.assert_allclose((y**2).sum(), total_sq, rtol=1e-5)
    np.testing.assert_allclose([y[p] for p in PIXELS], pixels, rtol=1e-5, atol=1e-6)


def test_denoising_helps():
    model, state = load_scico_dncnn("6M")
    x = reference_input()
    y = np.asarray(infer(model, state, x[..., None]))[..., 0]
    assert not np.allclose(y, x, atol=1e-2)  # the model does something
    assert np.abs(y - x).mean() < 0.2


# ---------------------------------------------------------------------------
# Batch norm: Flax's running averages, used as they are and updated as Flax does.


def _flax_norm(x, norm, mean, var, eps=1e-5):
    """Flax's batch norm in inference: the running averages as they are."""
    return (x - mean) / np.sqrt(var + eps) * norm.weight + norm.bias


@eqx.filter_jit
def norm_infer(norm, state, x):
    return norm(x, state, inference=True)[0]


@eqx.filter_jit
def norm_train(norm, state, x):
    return jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )[1]


RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 6, 6, 64)).astype(np.float32) + 0.5


def test_batch_norm_uses_running_averages_as_flax_does():
    model, state = load_scico_dncnn("6M")
    norm = model.blocks[0].norm
    mean, var = state.get(norm.batch_state_index)
    expected = _flax_norm(X[0], norm, mean, var)
    np.testing.assert_allclose(
        norm_infer(norm, state, X[0]), expected, rtol=1e-5, atol=1e-6
    )


def test_further_training_updates_the_averages_as_flax_does():
    model, state = load_scico_dncnn("6M")
    norm = model.blocks[1].norm
    mean0, var0 = (np.asarray(a) for a in state.get(norm.batch_state_index))
    state = norm_train(norm, state, X)
    # Flax: average = momentum * average + (1 - momentum) * batch, momentum 0.99.
    mean1 = 0.99 * mean0 + 0.01 * X.mean((0, 1, 2))
    var1 = 0.99 * var0 + 0.01 * X.var((0, 1, 2))
    expected = _flax_norm(X[0], norm, mean1, var1)
    np.testing.assert_allclose(
        norm_infer(norm, state, X[0]), expected, rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------------------
# Any file of the format: a small writer of Flax's msgpack encoding.


def _flax_tree(depth, channels, filters, kernel, seed=0) -> dict:
    """Random SCICO `DnCNNNet` variables, in Flax's names and `(kh, kw, in, out)`
    kernel layout, as NumPy arrays."""
    rng = np.random.default_rng(seed)

    def arrays(*shape, offset=0.0):
        return (rng.normal(size=shape) + offset).astype(np.float32)

    params = {"conv_start": {"kernel": arrays(kernel, kernel, channels, filters)}}
    stats = {}
    for i in range(depth - 2):
        params[f"ConvBNBlock_{i}"] = {
            "Conv_0": {"kernel": arrays(kernel, kernel, filters, filters)},
            "BatchNorm_0": {"scale": arrays(filters), "bias": arrays(filters)},
        }
        stats[f"ConvBNBlock_{i}"] = {
            "BatchNorm_0": {"mean": arrays(filters), "var": arrays(filters, offset=3)}
        }
    params["conv_end"] = {"kernel": arrays(kernel, kernel, filters, channels)}
    return {"params": params, "batch_stats": stats}


def _pack(tree):
    """Flax's msgpack encoding: each array an extension object of type 1."""

    def array(a):
        payload = (a.shape, a.dtype.name, np.ascontiguousarray(a).tobytes())
        return msgpack.ExtType(1, msgpack.packb(payload, use_bin_type=True))

    leaf = lambda x: array(x) if isinstance(x, np.ndarray) else x  # noqa: E731
    is_leaf = lambda x: not isinstance(x, dict)  # noqa: E731
    return msgpack.packb(jax.tree_util.tree_map(leaf, tree, is_leaf=is_leaf))


def _write(path: pathlib.Path, tree) -> pathlib.Path:
    path.write_bytes(_pack(tree))
    return path


def _equinox(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)


@settings(max_examples=4)
@given(
    depth=st.sampled_from([2, 3, 5]),
    channels=st.sampled_from([1, 3]),
    filters=st.sampled_from([4, 8]),
    kernel=st.sampled_from([3, 5]),
)
def test_any_file_loads(tmp_path_factory, depth, channels, filters, kernel):
    tree = _flax_tree(depth, channels, filters, kernel)
    path = tmp_path_factory.mktemp("mpk") / "model.mpk"
    model, state = load_scico_dncnn(_write(path, tree))
    assert (model.depth, model.channels, model.num_filters) == (
        depth,
        channels,
        filters,
    )
    assert model.conv_start.kernel_size == (kernel, kernel)
    params, stats = tree["params"], tree["batch_stats"]
    expected = [_equinox(params["conv_start"]["kernel"])]
    for i, block in enumerate(model.blocks):
        flax_block, flax_norm = params[f"ConvBNBlock_{i}"], f"ConvBNBlock_{i}"
        expected += [
            _equinox(flax_block["Conv_0"]["kernel"]),
            flax_block["BatchNorm_0"]["scale"],
            flax_block["BatchNorm_0"]["bias"],
        ]
        mean, var = state.get(block.norm.batch_state_index)
        np.testing.assert_array_equal(mean, stats[flax_norm]["BatchNorm_0"]["mean"])
        np.testing.assert_array_equal(var, stats[flax_norm]["BatchNorm_0"]["var"])
    expected.append(_equinox(params["conv_end"]["kernel"]))
    got = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_a_path_as_a_string(tmp_path):
    tree = _flax_tree(3, 1, 4, 3)
    model, _ = load_scico_dncnn(str(_write(tmp_path / "m.mpk", tree)))
    np.testing.assert_array_equal(
        model.conv_end.weight, _equinox(tree["params"]["conv_end"]["kernel"])
    )


# ---------------------------------------------------------------------------
# Errors name the argument, the value and the fix.


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="variant_or_path.*'6M'.*'17M'"):
        load_scico_dncnn("6X")
    with pytest.raises(ValueError, match="17N.*not shipped: pass their path"):
        load_scico_dncnn("17N")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="variant_or_path.*no such file"):
        load_scico_dncnn(tmp_path / "absent.mpk")


def test_wrong_type():
    with pytest.raises(TypeError, match="variant_or_path.*42"):
        load_scico_dncnn(42)  # pyright: ignore[reportArgumentType]


def _drop_var(tree):
    del tree["batch_stats"]["ConvBNBlock_0"]["BatchNorm_0"]["var"]


def _bad_shape(tree):
    tree["params"]["ConvBNBlock_0"]["BatchNorm_0"]["scale"] = np.ones(5, np.float32)


def _extra_block(tree):
    tree["params"]["ConvBNBlock_7"] = tree["params"]["ConvBNBlock_0"]


def _int_kernel(tree):
    tree["params"]["conv_end"]["kernel"] = np.ones((3, 3, 4, 1), np.int32)


def _unknown_ext(tree):
    tree["params"]["conv_end"]["kernel"] = msgpack.ExtType(5, b"xx")


def _short_buffer(tree):
    payload = ((3, 3, 4, 1), "float32", b"\0" * 8)
    tree["params"]["conv_end"]["kernel"] = msgpack.ExtType(1, msgpack.packb(payload))


def _valid_file(mutate):
    def data():
        tree = _flax_tree(3, 1, 4, 3)
        mutate(tree)
        return _pack(tree)

    return data


@pytest.mark.parametrize(
    "data, reason",
    [
        (lambda: b"\xc1 not msgpack", "not msgpack data"),
        (lambda: msgpack.packb([1, 2, 3]), "no entry 'params'"),
        (lambda: msgpack.packb({"params": {}, "batch_stats": {}}), "conv_start/kernel"),
        (_valid_file(_drop_var), "BatchNorm_0/var"),
        (_valid_file(_bad_shape), r"shape \(5,\), not \(4,\)"),
        (_valid_file(_extra_block), "numbered"),
        (_valid_file(_int_kernel), "not a floating-point array"),
        (_valid_file(_unknown_ext), "extension of type 5"),
        (_valid_file(_short_buffer), "holds 2 values"),
    ],
)
def test_not_a_scico_dncnn_file(tmp_path, data, reason):
    path = tmp_path / "bad.mpk"
    path.write_bytes(data())
    with pytest.raises(ValueError, match=f"bad.mpk.*not a Flax msgpack.*{reason}"):
        load_scico_dncnn(path)

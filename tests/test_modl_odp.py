"""MoDLNet and ODPNet: SCICO 0.0.7's numbers, traversals, clipping, errors.

The reference numbers (tests/data/scico_modl_odp.npz) were computed once by
SCICO 0.0.7 itself (tests/data/make_scico_modl_odp.py, run in a scratch
environment); SCICO is not needed here.
"""

import os
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_steps
from eqx_steps import models, operators


DATA = np.load(os.path.join(os.path.dirname(__file__), "data", "scico_modl_odp.npz"))
KW = dict(depth=2, channels=1, num_filters=8, block_depth=3)
SMALL = dict(depth=2, channels=1, num_filters=4, block_depth=2)
TOL = 1e-5


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def scico(case: str, what: str) -> dict:
    """The stored Flax tree `<case>|<what>|...` as nested dicts."""
    prefix = f"{case}|{what}|"
    return _nest(
        {k[len(prefix) :]: DATA[k] for k in DATA.files if k.startswith(prefix)}
    )


def variables(case: str, what: str = "variables") -> dict:
    return scico(case, what)


def rel(a, b) -> float:
    """Max relative difference over the float leaves of two PyTrees."""
    la = jax.tree_util.tree_leaves(eqx.filter((a,), eqx.is_inexact_array))
    lb = jax.tree_util.tree_leaves(eqx.filter((b,), eqx.is_inexact_array))
    assert len(la) == len(lb) and la
    worst = 0.0
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return worst


def psf_op(size: int = 32):
    return operators.CircularConvolve(DATA["psf||"], (size, size))


def build(case: str):
    """The Equinox model of each stored case (random init: weights are loaded)."""
    key = jax.random.PRNGKey(0)
    make = {
        "modl": lambda: models.MoDLNet(psf_op(), cg_iter=5, key=key, **KW),
        "odp": lambda: models.ODPNet(psf_op(), block="deconv", key=key, **KW),
        "odp_gd": lambda: models.ODPNet(
            psf_op(16), block="grad_desc", key=key, **SMALL
        ),
        "odp_dn": lambda: models.ODPNet(
            operators.FunctionOperator(lambda v: v, (16, 16, 1), (16, 16, 1)),
            block="denoise",
            key=key,
            **SMALL,
        ),
        "modl_ct": lambda: models.MoDLNet(
            operators.XRayTransform2D((16, 16), DATA["angles||"]),
            cg_iter=3,
            key=key,
            **SMALL,
        ),
        "dncnn": lambda: models.DnCNN(depth=3, channels=1, num_filters=4, key=key),
        "convbn": lambda: models.ConvBNNet(3, 1, 4, key=key),
        "resnet": lambda: models.ResNet(3, 1, 4, key=key),
        "unet": lambda: models.UNet(3, 1, 4, key=key),
    }[case]
    return make()


INPUT = {"modl": "y||", "odp": "y||", "modl_ct": "sino16||"}


@eqx.filter_jit
def _forward(model, state, y):
    out, new_state = eqx_steps.per_example(model, state, y)
    infer, _ = eqx_steps.per_example(model, state, y, inference=True)
    return out, new_state, infer


@pytest.mark.parametrize(
    "case",
    [
        "modl",
        "odp",
        "odp_gd",
        "odp_dn",
        "modl_ct",
        "dncnn",
        "convbn",
        "resnet",
        pytest.param("unet", marks=pytest.mark.slow),
    ],
)
def test_forward_matches_scico(case):
    """Training- and inference-mode outputs and the updated batch statistics."""
    model, state = models.from_scico_variables(build(case), variables(case))
    y = jnp.asarray(DATA[INPUT.get(case, "y16||")])
    out, new_state, infer = _forward(model, state, y)
    assert rel(out, DATA[f"{case}|train_out|"]) < TOL
    assert rel(infer, DATA[f"{case}|infer_out|"]) < TOL
    expected = {"params": variables(case)["params"]}
    expected["batch_stats"] = scico(case, "train_stats")
    _, expected_state = models.from_scico_variables(model, expected)
    assert rel(new_state, expected_state) < TOL


def test_modl_shared_resnet_updates_statistics_depth_times():
    """SCICO's quirk: the one ResNet runs `depth` times, its averages move twice."""
    model, state = models.from_scico_variables(build("modl"), variables("modl"))
    _, new_state, _ = _forward(model, state, jnp.asarray(DATA["y||"]))
    norm = model.resnet.norm_end
    assert norm.batch_counter is not None
    assert (
        int(new_state.get(norm.batch_counter)) - int(state.get(norm.batch_counter)) == 2
    )


def test_odp_alphas_halve_and_traversals_select_exactly_the_weights():
    model = build("odp")
    assert [float(b.alpha[0]) for b in model.blocks] == [0.5, 0.25]
    for m, name, n in ((model, "alpha", 2), (build("modl"), "lmbda", 1)):
        traversal = eqx_steps.construct_traversal(name)
        selected = [
            eqx_steps.path_to_str(p)
            for p, leaf in jax.tree_util.tree_flatten_with_path(m)[0]
            if traversal(p, leaf)
        ]
        assert len(selected) == n and all(s.endswith(name) for s in selected)
    # ODP uses SCICO's power-iteration estimate of ||A||, not the exact norm 1.
    assert 0.99 < model.operator_norm**2 < 0.999


def _steps(case: str, name: str, minvals, n: int):
    model, state = models.from_scico_variables(build(case), variables(case))
    lr = float(DATA["lr||"])
    ts = eqx_steps.TrainState.create(model, optax.adam(lr), model_state=state)
    devices = jax.devices()[:n]
    batch = eqx_steps.shard(
        {"image": DATA["y||"], "label": DATA["x||"]}, devices=devices
    )
    results = []
    for minval in minvals:
        post = [
            partial(
                eqx_steps.clip_positive,
                traversal=eqx_steps.construct_traversal(name),
                minval=minval,
            )
        ]
        step = eqx_steps.parallel_train_step(
            lambda s: lr,
            eqx_steps.mse_loss,
            eqx_steps.compute_metrics,
            post_lst=post,
            devices=devices,
        )
        ts, metrics = step(ts, batch)
        results.append((ts, metrics))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize(
    "case, name, minvals",
    [("modl", "lmbda", (5e-4, 0.51)), ("odp", "alpha", (5e-4, 0.3))],
)
def test_train_step_post_matches_scico(case, name, minvals, n):
    """Parameters and batch statistics after two Adam + clip_positive steps (the
    second one's clip fires) equal SCICO's pmapped steps on `n` devices."""
    for k, (ts, metrics) in enumerate(_steps(case, name, minvals, n), 1):
        expected = {
            "params": scico(case, f"step{k}_dev{n}_params"),
            "batch_stats": scico(case, f"step{k}_dev{n}_stats"),
        }
        ref_model, ref_state = models.from_scico_variables(ts.model, expected)
        assert rel(ts.model, ref_model) < TOL, (k, rel(ts.model, ref_model))
        assert rel(ts.model_state, ref_state) < TOL
        assert float(metrics["loss"]) == pytest.approx(
            float(DATA[f"{case}|step{k}_dev{n}_loss|"]), rel=TOL
        )
    clipped = ts.model.lmbda if case == "modl" else ts.model.blocks[1].alpha
    assert float(clipped[0]) == pytest.approx(minvals[1])


def _small_modl():
    return eqx.nn.make_with_state(models.MoDLNet)(
        psf_op(16), cg_iter=2, key=jax.random.PRNGKey(0), **SMALL
    )


def test_with_depth_carries_the_weights_over():
    model, state = _small_modl()
    deep = model.with_depth(3, cg_iter=4)
    assert (deep.depth, deep.cg_iter, model.depth, model.cg_iter) == (3, 4, 2, 2)
    for a, b in zip(jax.tree_util.tree_leaves(deep), jax.tree_util.tree_leaves(model)):
        assert a is b  # the same arrays, carried over
    out, _ = eqx.filter_jit(eqx_steps.per_example)(
        deep, state, jnp.asarray(DATA["y16||"])
    )
    assert out.shape == (2, 16, 16, 1) and bool(jnp.all(jnp.isfinite(out)))


def test_operator_gets_no_gradient():
    model, state = _small_modl()
    y = jnp.asarray(DATA["y16||"])

    def loss(m):
        out, _ = eqx_steps.per_example(m, state, y)
        return jnp.mean(out**2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(model)  # jitted: op by op is slow
    assert float(jnp.max(jnp.abs(grads.operator.psf))) == 0.0
    assert float(jnp.abs(grads.lmbda[0])) > 0.0


# ---------------------------------------------------------------- errors


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="`depth` must be an int >= 1, got 0"):
        models.MoDLNet(psf_op(), 0, 1, 8, 3, 5, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="`depth` must be an int >= 1"):
        models.ODPNet(psf_op(), 0, 1, 8, 3, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="`block` = 'deblur' is not valid"):
        models.ODPNet(psf_op(), 1, 1, 8, 3, "deblur", key=jax.random.PRNGKey(0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="from_linear_operator"):
        models.MoDLNet(lambda x: x, 1, 1, 8, 3, 5, key=jax.random.PRNGKey(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`depth` must be an int >= 1"):
        build("modl").with_depth(0)


def test_operator_output_shape_not_matching_the_data_is_an_error():
    model, state = eqx.nn.make_with_state(models.MoDLNet)(
        psf_op(16), 1, 1, 4, 2, 2, key=jax.random.PRNGKey(0)
    )
    with pytest.raises(
        ValueError, match="`y`.*shape \\(32, 32, 1\\).*`output_shape` is \\(16, 16\\)"
    ):
        eqx_steps.per_example(model, state, jnp.zeros((2, 32, 32, 1)))


def test_from_scico_variables_names_the_first_differing_path():
    made, _ = eqx.nn.make_with_state(models.MoDLNet)(
        psf_op(), cg_iter=5, key=jax.random.PRNGKey(0), **KW
    )
    with pytest.raises(ValueError, match="not the model returned by `eqx.nn.make_wi"):
        models.from_scico_variables(made, variables("modl"))
    v = variables("modl")
    del v["params"]["lmbda"]
    with pytest.raises(ValueError, match="'params/lmbda' is missing"):
        models.from_scico_variables(build("modl"), v)
    v = variables("modl")
    v["params"]["ResNet_0"]["Conv_0"]["kernel"] = np.zeros((3, 3, 8, 2), np.float32)
    with pytest.raises(ValueError, match="'params/ResNet_0/Conv_0/kernel' has shape"):
        models.from_scico_variables(build("modl"), v)
    with pytest.raises(ValueError, match="'params/ODPGrDescBlock_0/alpha' is missing"):
        models.from_scico_variables(build("odp_gd"), variables("odp"))
    with pytest.raises(ValueError, match="is not a parameter of this model"):
        models.from_scico_variables(
            build("resnet"),
            variables("convbn")
            | {"params": variables("convbn")["params"] | {"extra": np.ones(1)}},
        )
    with pytest.raises(ValueError, match="'params' and 'batch_stats'"):
        models.from_scico_variables(build("resnet"), {"params": {}})
    with pytest.raises(TypeError, match="must be one of"):
        models.from_scico_variables(eqx.nn.Linear(2, 2, key=jax.random.PRNGKey(0)), v)


# ---------------------------------------------------------------- the tutorial


@pytest.mark.slow
def test_deblur_ct_tutorial_runs(tmp_path):
    """docs/tutorials/deblur-ct.md shows examples/deblur_ct.py: it runs."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "examples", "deblur_ct.py")
    spec = importlib.util.spec_from_file_location("deblur_ct", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    picture = tmp_path / "deblur-ct.png"
    results = module.main(
        size=16, n_train=16, steps=2, batch_size=4, filters=4, picture=picture
    )
    assert picture.stat().st_size > 1000
    assert set(results) >= {"deblur_modl", "deblur_odp", "ct_modl", "blurred"}
    assert all(np.isfinite(v) for v in results.values())

"""The examples run, and the digits classifier trained with eqx_steps matches a
plain Equinox loop doing the same math."""

import importlib.util
import pathlib

import numpy as np
import pytest


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_example_matches_the_plain_equinox_loop():
    result = load_example("classify_digits").main(epochs=2, verbose=False)
    n = result["test_images"]
    assert n == 360 and result["steps"] == 2 * (1437 // 64)
    # The same math: the same weights (up to rounding) and the same test images
    # classified correctly.
    assert result["max_weight_rel_diff"] < 1e-4
    assert round(result["eqx_steps_accuracy"] * n) == round(
        result["plain_accuracy"] * n
    )
    # Two epochs of a small CNN already classify most digits (10 classes).
    assert result["eqx_steps_accuracy"] > 0.85
    assert result["eqx_steps_ms_per_step"] > 0 and result["plain_ms_per_step"] > 0


def test_digits_data_is_what_its_readme_says():
    with np.load(EXAMPLES / "data" / "digits.npz") as data:
        assert set(data.files) == {"images", "labels"}
        images, labels = data["images"], data["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert images.max() == 16 and set(np.unique(labels)) == set(range(10))


@pytest.mark.slow
def test_tiny_example_runs(capsys):
    load_example("train_tiny").main(steps=3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("4 devices") and len(lines) == 4
    assert all("loss" in line for line in lines[1:])


@pytest.mark.slow
def test_coming_from_equinox_example_gives_the_plain_loops_losses():
    # A GRU on token ids and a model of two inputs, trained by a plain Equinox
    # loop, by BasicTrainer and by an own loop over parallel_train_step, on the
    # same batches: the same last-batch loss.
    results = load_example("from_equinox").main(verbose=False)
    assert set(results) == {"tokens", "two_inputs"}
    for losses in results.values():
        plain = losses["plain"]
        assert np.isfinite(plain)
        np.testing.assert_allclose(losses["trainer"], plain, rtol=1e-5)
        np.testing.assert_allclose(losses["own_loop"], plain, rtol=1e-5)

"""What a run reports: its History across a resume, and the parameter overview."""

import equinox as eqx
import jax
import pytest

import eqx_steps as es
from eqx_steps.models import ConvBNNet
from eqx_steps.synthetic import make_denoising_data


def _trainer(workdir, epochs):
    train_ds, test_ds = make_denoising_data(96, 16, size=8, noise_std=0.1, seed=0)
    model, model_state = eqx.nn.make_with_state(ConvBNNet)(
        depth=2, channels=1, num_filters=4, key=jax.random.key(0)
    )
    config = {
        "batch_size": 16,
        "num_epochs": epochs,
        "base_learning_rate": 1e-2,
        "log_every_steps": 3,
        "log": True,
        "checkpointing": True,
        "workdir": str(workdir),
    }
    return es.BasicTrainer(config, model, train_ds, test_ds, model_state=model_state)


@pytest.mark.slow
def test_a_resumed_run_keeps_its_history_and_elapsed_time(tmp_path, capsys):
    _, first = _trainer(tmp_path, 1).train()
    assert [r["step"] for r in first.records] == [3, 6]
    # A new trainer (a new process, after Ctrl-C or for more epochs) resumes at 6.
    trainer = _trainer(tmp_path, 2)
    assert int(trainer.state.step) == 6
    _, history = trainer.train()
    capsys.readouterr()
    assert [r["step"] for r in history.records] == [3, 6, 9, 12]
    assert history.records[:2] == first.records
    times = [r["time"] for r in history.records]
    assert times == sorted(times) and times[2] > times[1]  # continues, not restarts
    # SCICO's statistics object and the curves see every step.
    assert list(history.history(transpose=True).Step) == [3, 6, 9, 12]
    assert history.plot(tmp_path / "curves.png") == ["loss", "snr"]


def test_the_overview_names_batch_norm_statistics_after_their_layer():
    model, state = eqx.nn.make_with_state(ConvBNNet)(
        depth=3, channels=1, num_filters=4, key=jax.random.key(0)
    )
    params = es.parameter_overview(model)
    stats = es.parameter_overview(state)
    names = [line.split("|")[1].strip() for line in stats.splitlines()[3:-2]]
    norms = sorted({n.rsplit(".", 1)[0] for n in names})
    assert norms and "flat index" not in stats
    for norm in norms:  # each owned by a layer of the parameter table
        assert f"{norm}.weight" in params
        assert [f"{norm}.{s}" for s in ("batch_counter", "mean", "var")] == [
            n for n in names if n.startswith(norm + ".")
        ]
    # SCICO's total row, counting every entry.
    total = sum(x.size for x in jax.tree_util.tree_leaves(state))
    assert stats.splitlines()[-1] == f"Total weights: {total:,}"
    # A State inside a larger tree keeps its entries' names under its own path.
    both = es.parameter_overview({"model_state": state})
    assert f"['model_state'].{norms[0]}.mean" in both

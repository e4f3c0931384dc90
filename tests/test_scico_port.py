"""The SCICO example ported to eqx_steps (examples/scico_port.py) runs, denoises,
and behaves as SCICO's script does: `only_apply` restores the final checkpoint, and
a second run in the same folder restores it instead of training again."""

import numpy as np
import pytest
from test_examples import load_example


@pytest.mark.slow
def test_scico_port_trains_applies_and_reruns(tmp_path, capsys):
    port = load_example("scico_port")
    first = port.main(workdir=str(tmp_path), verbose=False)
    out, err = capsys.readouterr()
    # 256 patches / batch 16 x 10 epochs; only_apply restored that checkpoint.
    assert int(first["state"].step) == 160
    assert "restored checkpoint step 160" in err
    # Every test patch has its output, the 4 of the last partial batch included.
    assert first["output"].shape == (36, 16, 16, 1)
    assert first["snr_eval"] > first["snr_noisy"] + 2
    assert "DnCNNNet testing" in out and "Eval SNR by epoch: 1: " in out
    assert len(first["history"].records) == 10

    # SCICO's rerun: the trainer restores the last checkpoint and has nothing to
    # do; the outputs are those of the same weights.
    again = port.main(workdir=str(tmp_path), verbose=False)
    assert int(again["state"].step) == 160 and not again["history"].records
    np.testing.assert_array_equal(again["output"], first["output"])

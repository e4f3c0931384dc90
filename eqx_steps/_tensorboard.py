"""Experiment tracking: a hook that writes TensorBoard event files.

The trainer's records (`History`) are what any tracker wants; this hook hands
them to `tensorboardX` (the optional extra `eqx_steps[tensorboard]`). Another
tracker is a hook of a few lines (see docs/tracking.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from jaxtyping import Float


try:
    import tensorboardX
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "eqx_steps.tensorboard_hook writes with tensorboardX, which is not "
        'installed: pip install "eqx_steps[tensorboard]"'
    ) from e

from ._history import History
from ._hooks import StepInfo


# A record's bookkeeping entries, not scalars to plot.
_NOT_SCALARS = ("step", "epoch", "time")


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a record's entry: `train_loss` -> `train/loss`,
    `eval_snr` -> `eval/snr`, `train_learning_rate` -> `learning_rate` (one
    section per set, the learning rate on its own)."""
    if key == "train_learning_rate":
        return "learning_rate"
    for prefix in ("train_", "eval_"):
        if key.startswith(prefix):
            return prefix[:-1] + "/" + key[len(prefix) :]
    return key


class TensorBoardHook:
    """A trainer hook writing TensorBoard event files; see
    [`eqx_steps.tensorboard_hook`][].

    Call it as a hook (`trainer.add_hook(hook, every=...)`); add images with
    [`eqx_steps.TensorBoardHook.add_image`][] and end with
    [`eqx_steps.TensorBoardHook.close`][] (or use it as a context manager).
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        history: History | None,
        config: Mapping[str, Any] | None,
    ):
        import jax

        self.logdir = os.fspath(logdir)
        self.history = history
        # One writer per job: the records are the same on every process.
        self.writer = (
            tensorboardX.SummaryWriter(self.logdir)
            if jax.process_index() == 0
            else None
        )
        self._last_step: int | None = None
        if config is not None and self.writer is not None:
            text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
            # Markdown: indented by four spaces, a code block.
            self.writer.add_text(
                "config", "    " + text.replace("\n", "\n    "), global_step=0
            )
            self.writer.flush()

    def __call__(self, info: StepInfo) -> None:
        if self.writer is None:
            return
        if self.history is not None:
            record = self.history.records[-1] if self.history.records else {}
            if record.get("step") != info.step or self._last_step == info.step:
                return  # no new record at this step
            scalars = {
                k: float(v)
                for k, v in record.items()
                if k not in _NOT_SCALARS and isinstance(v, (int, float))
            }
        else:
            scalars = {
                f"train_{k}": float(np.mean(np.asarray(v)))
                for k, v in info.metrics.items()
            }
        self._last_step = info.step
        for key, value in scalars.items():
            self.writer.add_scalar(scalar_tag(key), value, global_step=info.step)
        self.writer.flush()

    def add_image(
        self,
        tag: str,
        image: str | os.PathLike | Float[np.ndarray, "H W C"],
        step: int,
    ) -> None:
        """Write an image (say, the command's `samples.png`).

        **Arguments:**

        - `tag`: its name in TensorBoard.
        - `image`: an image file, or an `(H, W)`, `(H, W, 1)` or `(H, W, 3)`
            array with values in `[0, 1]`.
        - `step`: the training step it shows.
        """
        if self.writer is None:
            return
        if isinstance(image, (str, os.PathLike)):
            from .images import read_image

            image = read_image(image)
        array = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
        if array.ndim == 2:
            array = array[..., None]
        self.writer.add_image(tag, array, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> TensorBoardHook:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tensorboard_hook(
    logdir: str | os.PathLike,
    history: History | None = None,
    *,
    config: Mapping[str, Any] | None = None,
) -> TensorBoardHook:
    """A hook that writes the run's metrics to TensorBoard event files.

    With `history` (the trainer's, `trainer.history`), each record it gains is
    written when the hook runs at the record's step: the train metrics averaged
    since the previous record (`train/loss`, `train/snr`, ...), the evaluation
    (`eval/loss`, `eval/snr`, ...) and the learning rate (`learning_rate`), at
    that step. Add it with `every=trainer.log_every_steps` (or 1). Without
    `history`, each call writes the train metrics of that call (averaged over
    its steps). `config` is written once, as JSON text under `config`. Only
    process 0 writes.

    Needs `tensorboardX` (`pip install "eqx_steps[tensorboard]"`). View the
    files with `tensorboard --logdir LOGDIR`.

    **Arguments:**

    - `logdir`: the folder of the event files (created if needed).
    - `history`: the trainer's `History`, or `None`.
    - `config`: the run's configuration (JSON values), or `None`.

    **Returns:**

    A [`eqx_steps.TensorBoardHook`][]: the hook, with `add_image` and `close`.

    !!! example

        ```python
        trainer = es.BasicTrainer(config, model, train_ds, test_ds)
        with es.tensorboard_hook("runs/tb", trainer.history, config=config) as tb:
            trainer.add_hook(tb, every=trainer.log_every_steps)
            trainer.train()
        ```
    """
    return TensorBoardHook(logdir, history, config)

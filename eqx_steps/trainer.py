"""The training loop: configuration, `BasicTrainer` and its `History`.

`BasicTrainer` is SCICO's `BasicFlaxTrainer` for Equinox models. It composes the
pieces of this library: the data iterators (`data.py`), the parallel steps
(`parallel.py`), checkpoints (`checkpoint.py`). Its defaults live in one typed,
frozen dataclass, `TrainConfig`; a SCICO-style dict (`ConfigDict`) is accepted and
validated into one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._io import atomic_write
from .checkpoint import checkpoint_restore, checkpoint_save
from .data import create_input_iter
from .losses import mse_loss
from .metrics import compute_metrics
from .parallel import parallel_eval_step, parallel_train_step
from .schedules import create_cnst_lr_schedule
from .state import create_basic_train_state, TrainState
from .steps import eval_step, train_step


class ConfigDict(TypedDict, total=False):
    """SCICO's configuration keys, with their SCICO meaning.

    Every key is optional; a missing key takes its default from
    [`eqx_steps.TrainConfig`][].
    """

    seed: int
    opt_type: str
    momentum: float
    batch_size: int
    num_epochs: int
    base_learning_rate: float
    lr_decay_rate: float
    warmup_epochs: int
    steps_per_eval: int
    log_every_steps: int
    steps_per_checkpoint: int
    log: bool
    workdir: str
    checkpointing: bool
    return_state: bool
    lr_schedule: Callable
    criterion: Callable
    create_train_state: Callable
    train_step_fn: Callable
    eval_step_fn: Callable
    metrics_fn: Callable
    post_lst: Sequence[Callable]
    backend: str
    steps_per_call: int
    nan_policy: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The configuration of a training run, with SCICO's defaults.

    `None` means "derived from the data", as in SCICO: `batch_size` = 2 x the
    device count, `steps_per_eval` = a whole pass over the test set,
    `log_every_steps` = 20 epochs, `steps_per_checkpoint` = 10 epochs.

    The last three fields go beyond SCICO: `backend` and `steps_per_call` of
    [`eqx_steps.parallel_train_step`][], and its `nan_policy`.
    """

    seed: int = 0
    opt_type: str = "ADAM"
    momentum: float | None = None
    batch_size: int | None = None
    num_epochs: int = 10
    base_learning_rate: float = 1e-2
    lr_decay_rate: float = 0.95
    warmup_epochs: int = 0
    steps_per_eval: int | None = None
    log_every_steps: int | None = None
    steps_per_checkpoint: int | None = None
    log: bool = False
    workdir: str = "./"
    checkpointing: bool = False
    return_state: bool = True
    lr_schedule: Callable = create_cnst_lr_schedule
    criterion: Callable = mse_loss
    create_train_state: Callable = create_basic_train_state
    train_step_fn: Callable = train_step
    eval_step_fn: Callable = eval_step
    metrics_fn: Callable = compute_metrics
    post_lst: tuple[Callable, ...] | None = None
    backend: str = "pmap"
    steps_per_call: int = 1
    nan_policy: str = "raise"

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | TrainConfig) -> TrainConfig:
        """Validate a SCICO-style dict into a `TrainConfig`.

        **Arguments:**

        - `config`: a mapping of [`eqx_steps.ConfigDict`][] keys.

        **Returns:**

        The `TrainConfig`; missing keys take their defaults.

        **Raises:**

        `ValueError` for an unknown key (naming the closest valid one) and
        `TypeError` for a value of the wrong type (naming the key).
        """
        if isinstance(config, TrainConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(
                "`config` must be a dict or a TrainConfig, got "
                f"{type(config).__name__}."
            )
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for key, value in config.items():
            if key == "steps_per_epoch":  # SCICO writes this derived value back
                continue
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "valid keys are " + (", ".join(names))
                )
                raise ValueError(f"unknown config key {key!r}: {hint}")
            values[key] = _check_type(key, value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a plain dict (callables included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,),
    "opt_type": (str,),
    "momentum": (int, float, type(None)),
    "batch_size": (int, type(None)),
    "num_epochs": (int,),
    "base_learning_rate": (int, float),
    "lr_decay_rate": (int, float),
    "warmup_epochs": (int,),
    "steps_per_eval": (int, type(None)),
    "log_every_steps": (int, type(None)),
    "steps_per_checkpoint": (int, type(None)),
    "log": (bool,),
    "workdir": (str, os.PathLike),
    "checkpointing": (bool,),
    "return_state": (bool,),
    "backend": (str,),
    "steps_per_call": (int,),
    "nan_policy": (str,),
}
_POSITIVE = {
    "batch_size",
    "num_epochs",
    "steps_per_eval",
    "log_every_steps",
    "steps_per_checkpoint",
    "steps_per_call",
}


def _check_type(key: str, value: Any) -> Any:
    if key in _TYPES:
        types = _TYPES[key]
        ok = isinstance(value, types) and not (
            isinstance(value, bool) and bool not in types
        )
        if not ok:
            names = " or ".join(
                "None" if t is type(None) else t.__name__ for t in types
            )
            raise TypeError(
                f"config[{key!r}] must be {names}, got "
                f"{type(value).__name__} {value!r}."
            )
        if key in _POSITIVE and value is not None and value < 1:
            raise ValueError(f"config[{key!r}] must be at least 1, got {value!r}.")
        if key == "workdir":
            value = os.fspath(cast(Any, value))
        return value
    if key == "post_lst":
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(map(callable, value)):
            raise TypeError(
                f"config['post_lst'] must be a list of functions model -> model, got "
                f"{value!r}."
            )
        return tuple(value)
    if not callable(value):
        raise TypeError(f"config[{key!r}] must be a function, got {value!r}.")
    return value


# ---------------------------------------------------------------------------
# History and the parameter overview.


@dataclasses.dataclass
class History:
    """The records of a training run, one per log point.

    Each record holds `epoch`, `step`, `time` (seconds since the start),
    `train_learning_rate`, `train_loss`, `train_snr`, `eval_loss` and `eval_snr`
    (and any other metric the metrics function returns, with its prefix).
    """

    records: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def append(self, record: Mapping[str, float]) -> None:
        """Add one record."""
        self.records.append(dict(record))

    def to_dict(self) -> dict[str, list[float]]:
        """The records column by column: `{"step": [...], "train_loss": [...], ...}`."""
        keys: list[str] = []
        for r in self.records:
            keys.extend(k for k in r if k not in keys)
        return {k: [r.get(k, math.nan) for r in self.records] for k in keys}

    def plot(self, path: str | os.PathLike) -> None:
        """Write a PNG of the loss and SNR curves (train and eval) against steps.

        **Arguments:**

        - `path`: the PNG file to write (atomically).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = self.to_dict()
        fig, (ax_loss, ax_snr) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
        steps = cols.get("step", [])
        for name, ax in (("loss", ax_loss), ("snr", ax_snr)):
            for split, style in (("train", "o-"), ("eval", "s--")):
                values = cols.get(f"{split}_{name}")
                if values:
                    ax.plot(steps, values, style, label=split, markersize=3)
            ax.set_xlabel("step")
            ax.set_ylabel("loss" if name == "loss" else "SNR (dB)")
            ax.grid(alpha=0.3)
            ax.legend()
        if cols.get("train_loss") and min(cols["train_loss"]) > 0:
            ax_loss.set_yscale("log")
        ax_loss.set_title("loss")
        ax_snr.set_title("signal-to-noise ratio")
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)


def parameter_overview(tree: PyTree) -> str:
    """A table of the array leaves of a PyTree: name, shape, size, mean and std.

    As SCICO's `get_parameter_overview`, for Equinox models and their state.

    **Arguments:**

    - `tree`: a model, an `eqx.nn.State` or any PyTree.

    **Returns:**

    The table as text, with the total number of entries on the last line.
    """
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        eqx.filter(tree, eqx.is_array)
    )[0]:
        arr = np.asarray(leaf)
        name = jax.tree_util.keystr(path).lstrip(".")
        if arr.dtype.kind == "f" and arr.size:
            stats = (f"{arr.mean():.3g}", f"{arr.std():.3g}")
        else:
            stats = ("", "")
        rows.append((name, str(arr.shape), f"{arr.size:,}", *stats))
    header = ("Name", "Shape", "Size", "Mean", "Std")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    total = sum(
        np.size(x) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    )
    out = [sep, line(header), sep, *map(line, rows), sep, f"Total: {total:,}"]
    return "\n".join(out)


# ---------------------------------------------------------------------------
# The trainer.


def evaluate_dataset(
    eval_fn: Callable[[TrainState, Any], Mapping[str, Any]],
    state: TrainState,
    dataset: Mapping[str, Any],
    batch_size: int,
    *,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Average a parallel evaluation step over a dataset, every example once.

    The evaluation iterator pads the last partial batch and masks the padding;
    each batch's metrics are weighted by its number of real examples.

    **Arguments:**

    - `eval_fn`: a function from [`eqx_steps.parallel_eval_step`][].
    - `state`: the state to evaluate.
    - `dataset`: a dict of arrays with `"image"` and `"label"`.
    - `batch_size`: the global batch size (a multiple of the device count).
    - `max_batches`: stop after this many batches (`None`: the whole dataset).

    **Returns:**

    The metrics averaged over the examples seen.
    """
    it = create_input_iter(None, dataset, batch_size, train=False)
    sums: dict[str, float] = {}
    count = 0.0
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        metrics = jax.device_get(dict(eval_fn(state, batch)))
        n = float(metrics.pop("count", batch_size))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        count += n
    return {k: v / max(count, 1.0) for k, v in sums.items()}


def _check_dataset(name: str, ds: Any) -> None:
    if not isinstance(ds, Mapping):
        raise TypeError(
            f"`{name}` must be a dict of arrays with keys 'image' and 'label', got "
            f"{type(ds).__name__}."
        )
    missing = [k for k in ("image", "label") if k not in ds]
    if missing:
        raise ValueError(
            f"`{name}` has keys {sorted(ds)} but lacks {missing}; the steps read "
            "'image' (input) and 'label' (target): rename your keys."
        )


class BasicTrainer:
    """Train an Equinox model with data-parallel steps, as SCICO's `BasicFlaxTrainer`.

    Everything is set up and validated on construction (configuration, data,
    optimizer, the initial or restored state), so a bad input fails before any
    training starts; [`eqx_steps.BasicTrainer.train`][] runs the loop.

    !!! example

        ```python
        model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
            depth=6, channels=1, num_filters=32, key=jax.random.key(0)
        )
        trainer = es.BasicTrainer(
            {"num_epochs": 5, "batch_size": 16, "log": True},
            model, train_ds, test_ds, model_state=model_state,
        )
        state, history = trainer.train()
        history.plot("curves.png")
        ```
    """

    def __init__(
        self,
        config: Mapping[str, Any] | TrainConfig,
        model: PyTree,
        train_ds: Mapping[str, Any],
        test_ds: Mapping[str, Any],
        *,
        model_state: eqx.nn.State | None = None,
    ):
        """**Arguments:**

        - `config`: a [`eqx_steps.ConfigDict`][] (SCICO's keys) or a
            [`eqx_steps.TrainConfig`][].
        - `model`: the initialised Equinox model; it takes one example.
        - `train_ds`, `test_ds`: dicts of arrays with equal leading length and keys
            `"image"` and `"label"`.
        - `model_state`: the model's `eqx.nn.State` (BatchNorm statistics), or
            `None`.
        """
        self.config = cfg = TrainConfig.from_dict(config)
        _check_dataset("train_ds", train_ds)
        _check_dataset("test_ds", test_ds)
        n_devices = jax.device_count()
        self.batch_size = batch_size = cfg.batch_size or 2 * n_devices
        if batch_size % n_devices:
            lo = max(n_devices, batch_size // n_devices * n_devices)
            raise ValueError(
                f"config['batch_size'] = {batch_size} is not divisible by the "
                f"{n_devices} devices; use {lo} or {lo + n_devices}."
            )
        key = jax.random.key(cfg.seed)
        self.data_key, _ = jax.random.split(key)
        self.train_ds, self.test_ds = train_ds, test_ds
        # The iterators validate the data (lengths, enough examples for a batch).
        probe = create_input_iter(
            self.data_key, train_ds, batch_size, size_device_prefetch=0, train=True
        )
        self.steps_per_epoch = int(probe.steps_per_epoch)
        create_input_iter(
            self.data_key, test_ds, batch_size, size_device_prefetch=0, train=False
        )
        self.num_steps = self.steps_per_epoch * cfg.num_epochs
        self.steps_per_eval = cfg.steps_per_eval
        self.log_every_steps = cfg.log_every_steps or self.steps_per_epoch * 20
        self.steps_per_checkpoint = (
            cfg.steps_per_checkpoint or self.steps_per_epoch * 10
        )
        self.workdir = os.path.abspath(cfg.workdir)
        self.is_main = jax.process_index() == 0

        schedule_config = {**cfg.to_dict(), "steps_per_epoch": self.steps_per_epoch}
        self.lr_schedule = cfg.lr_schedule(schedule_config)
        state = cfg.create_train_state(
            schedule_config, model, self.lr_schedule, model_state=model_state
        )
        if not isinstance(state, TrainState):
            raise TypeError(
                "config['create_train_state'] must return an eqx_steps.TrainState, got "
                f"{type(state).__name__}."
            )
        if cfg.checkpointing:
            state = checkpoint_restore(state, self.workdir, ok_no_ckpt=True)
        self.state = state

        def train_fn(steps_per_call: int):
            return parallel_train_step(
                self.lr_schedule,
                cfg.criterion,
                cfg.metrics_fn,
                post_lst=cfg.post_lst,
                train_step_fn=cfg.train_step_fn,
                backend=cfg.backend,  # pyright: ignore
                steps_per_call=steps_per_call,
                nan_policy=cfg.nan_policy,  # pyright: ignore
            )

        # Single steps fill up to log and checkpoint boundaries.
        self.train_fn = train_fn(1)
        k = cfg.steps_per_call
        self.multi_fn = train_fn(k) if k > 1 else None
        self.eval_fn = parallel_eval_step(
            cfg.criterion,
            cfg.metrics_fn,
            eval_step_fn=cfg.eval_step_fn,
            backend=cfg.backend,  # pyright: ignore
        )
        self.history = History()

    # -- helpers -------------------------------------------------------------

    def log(self, text: str) -> None:
        """Print `text` when `config.log` is set (process 0 only)."""
        if self.config.log and self.is_main:
            print(text, flush=True)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Metrics over the test set (every example once), or `steps_per_eval` batches.

        **Arguments:**

        - `state`: the state to evaluate.

        **Returns:**

        The metrics, averaged over the examples.
        """
        return evaluate_dataset(
            self.eval_fn,
            state,
            self.test_ds,
            self.batch_size,
            max_batches=self.steps_per_eval,
        )

    def _boundaries(self, step: int) -> int:
        """The next step at which the loop must stop to log or checkpoint."""
        nxt = self.num_steps
        for every in (self.log_every_steps, self.steps_per_checkpoint):
            nxt = min(nxt, (step // every + 1) * every)
        return nxt

    def _record(self, state, step, train_metrics, t0) -> dict[str, float]:
        record: dict[str, float] = {
            "epoch": step // self.steps_per_epoch,
            "step": step,
            "time": time.time() - t0,
        }
        if train_metrics:
            stacked = jax.device_get(train_metrics)
            for k in stacked[0]:
                record[f"train_{k}"] = float(
                    np.mean(np.concatenate([np.atleast_1d(m[k]) for m in stacked]))
                )
        for k, v in self.evaluate(state).items():
            record[f"eval_{k}"] = v
        return record

    def _write_metrics(self, record: Mapping[str, float]) -> None:
        path = os.path.join(self.workdir, "metrics.jsonl")
        old = ""
        if os.path.exists(path):
            with open(path) as f:
                old = f.read()
        line = json.dumps(dict(record)) + "\n"
        atomic_write(path, (old + line).encode())

    # -- the loop --------------------------------------------------------------

    def train(self) -> tuple[TrainState, History]:
        """Run the training loop.

        Trains for `num_epochs` epochs from the initial (or restored) state: logs
        train and eval metrics every `log_every_steps` steps into the returned
        `History` (and, with `log=True`, prints them, shows a progress bar and
        appends them to `workdir/metrics.jsonl`), and with `checkpointing=True`
        saves a checkpoint every `steps_per_checkpoint` steps and at the end.

        **Returns:**

        A 2-tuple of the final `TrainState` and the `History`.
        """
        cfg = self.config
        state = self.state
        step = int(state.step)
        self.log("Network Structure:")
        self.log(parameter_overview(state.model))
        if state.model_state is not None:
            self.log("Batch Normalization:")
            self.log(parameter_overview(state.model_state))
        if step >= self.num_steps:
            self.log(f"Nothing to do: the state is at step {step} of {self.num_steps}.")
            return state, self.history
        data = create_input_iter(
            self.data_key, self.train_ds, self.batch_size, train=True, start_step=step
        )
        bar = None
        if cfg.log and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.num_steps,
                initial=step,
                desc="train",
                unit="step",
                file=sys.stdout,
                dynamic_ncols=True,
            )
        t0 = time.time()
        train_metrics: list[Any] = []
        k = cfg.steps_per_call
        try:
            while step < self.num_steps:
                stop = self._boundaries(step)
                while step < stop:
                    if self.multi_fn is not None and stop - step >= k:
                        batches = [next(data) for _ in range(k)]
                        stacked = jax.tree_util.tree_map(
                            lambda *xs: jnp.stack(xs), *batches
                        )
                        state, metrics = self.multi_fn(state, stacked)
                        done = k
                    else:
                        state, metrics = self.train_fn(state, next(data))
                        done = 1
                    train_metrics.append(metrics)
                    step += done
                    if bar is not None:
                        bar.update(done)
                if step % self.log_every_steps == 0 or step == self.num_steps:
                    record = self._record(state, step, train_metrics, t0)
                    train_metrics = []
                    self.history.append(record)
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{record.get('train_loss', math.nan):.4g}",
                            snr=f"{record.get('eval_snr', math.nan):.2f}",
                        )
                    if cfg.log and self.is_main:
                        self._write_metrics(record)
                if cfg.checkpointing and (
                    step % self.steps_per_checkpoint == 0 or step == self.num_steps
                ):
                    checkpoint_save(state, cfg.to_dict(), self.workdir)
        finally:
            if bar is not None:
                bar.close()
        self.state = state
        if self.history.records:
            last = self.history.records[-1]
            self.log(
                "Done: "
                + ", ".join(
                    f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch",)
                )
            )
        return state, self.history

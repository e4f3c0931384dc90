"""What a training run reports: its `History` (the records of its log points, as
SCICO's iteration statistics), a record as a line, and the parameter overview."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from ._io import atomic_write


# SCICO's field names (scico.flax.train.diagnostics.stats_obj) for our keys; other
# keys get the same style (`train_accuracy` -> `Train_Accuracy`).
_SCICO_FIELDS = {"epoch": "Epoch", "time": "Time", "train_learning_rate": "Train_LR"}
_ACRONYMS = {"snr": "SNR", "psnr": "PSNR", "lr": "LR", "mse": "MSE", "mae": "MAE"}
_SPLITS = ("train_", "eval_")
# A setting of the run and the non-finite policy's count: not measures of the model.
_NOT_METRICS = ("learning_rate", "nonfinite")
_TITLES = {
    "loss": "loss",
    "snr": "signal-to-noise ratio (dB)",
    "psnr": "peak signal-to-noise ratio (dB)",
}
_YLABELS = {"snr": "SNR (dB)", "psnr": "PSNR (dB)"}
# The curves' legend: the eval metrics are the test set's (SCICO's evaluation).
_SPLIT_LABELS = {"train": "train", "eval": "eval (test set)"}


def _scico_name(key: str) -> str:
    if key in _SCICO_FIELDS:
        return _SCICO_FIELDS[key]
    words = [w for w in re.split(r"[\W_]+", key) if w]
    return "_".join(_ACRONYMS.get(w.lower(), w.capitalize()) for w in words) or key


def format_record(record: Mapping[str, Any]) -> str:
    """One line for a record: `step 12 (epoch 1): train_loss 0.0123, ...`."""
    values = ", ".join(
        f"{k} {v:.4g}"
        for k, v in record.items()
        if k not in ("step", "epoch", "time", "train_nonfinite")
        or (k == "train_nonfinite" and v)
    )
    head = f"step {record.get('step')} (epoch {record.get('epoch')})"
    return f"{head}: {values}, {record.get('time', math.nan):.1f} s"


@dataclasses.dataclass
class History:
    """The records of a training run, one per log point.

    Each record holds `epoch`, `step`, `time` (the elapsed training time in
    seconds: from the start of `train()` to the log point, before evaluating;
    a run resumed with `log=True` starts with the records of `metrics.jsonl` up
    to its checkpoint, and its `time` continues from the last of them),
    `train_learning_rate`, and
    `train_<m>` and `eval_<m>` for every metric `m` the metrics function returns
    (`loss` and `snr` for [`eqx_steps.compute_metrics`][], `loss` and `accuracy`
    for a classifier): the train metrics averaged over the steps since the last
    log point, the eval metrics over the test set.
    """

    records: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def append(self, record: Mapping[str, float]) -> None:
        """Add one record."""
        self.records.append(dict(record))

    def keys(self) -> list[str]:
        """Every key of the records, in the order first seen."""
        return list(dict.fromkeys(k for r in self.records for k in r))

    def to_dict(self) -> dict[str, list[float]]:
        """The records column by column: `{"step": [...], "train_loss": [...], ...}`."""
        return {k: [r.get(k, math.nan) for r in self.records] for k in self.keys()}

    @property
    def metrics(self) -> list[str]:
        """The names of the metrics recorded (`"loss"`, `"snr"`, `"accuracy"`...),
        without their `train_`/`eval_` prefix: `"loss"` first, then in the order
        first seen. The learning rate (a setting) and the count of non-finite
        steps of `nan_policy` are not among them."""
        names = [k.split("_", 1)[1] for k in self.keys() if k.startswith(_SPLITS)]
        names = ["loss", *names] if "loss" in names else names
        return [m for m in dict.fromkeys(names) if m not in _NOT_METRICS]

    def history(self, transpose: bool = False) -> Any:
        """The records as SCICO's statistics object returns them.

        Fields are named as SCICO names them (`Epoch`, `Time`, `Train_LR`,
        `Train_Loss`, `Train_SNR`, `Eval_Loss`, `Eval_SNR`), plus `Step` and one
        field per other metric in the same style (`Eval_Accuracy`).

        **Arguments:**

        - `transpose`: `False` (default) for a list of records, `True` for one
            record of columns, as `IterationStats.history(transpose=True)`.

        **Returns:**

        A list of named tuples, one per log point; or with `transpose=True` one
        named tuple holding a NumPy array per field (a value missing from a
        record is `nan`).
        """
        keys = self.keys()
        record_type = collections.namedtuple(  # pyright: ignore
            "HistoryRecord", [_scico_name(k) for k in keys], rename=True
        )
        if transpose:
            return record_type(*(np.asarray(c) for c in self.to_dict().values()))
        return [record_type(*(r.get(k, math.nan) for k in keys)) for r in self.records]

    def plot(self, path: str | os.PathLike) -> list[str]:
        """Write a PNG of the metrics (train and eval) against steps.

        One panel per metric that has a finite value (see
        [`eqx_steps.History.metrics`][]): loss and SNR for a denoiser, loss and
        accuracy for a classifier, each with its train and its eval (test set)
        curve, its name on the y axis. A history without records gets a figure
        that says so.

        **Arguments:**

        - `path`: the PNG file to write (atomically).

        **Returns:**

        The names of the metrics drawn, one per panel, left to right.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = self.to_dict()
        steps = cols.get("step") or list(range(len(self.records)))
        finite = {k: np.isfinite(np.asarray(v, float)).any() for k, v in cols.items()}
        names = [
            m for m in self.metrics if any(finite.get(s + m, False) for s in _SPLITS)
        ]
        fig, axes = plt.subplots(
            1, max(len(names), 1), figsize=(5 * max(len(names), 1), 4), dpi=100
        )
        axes = np.atleast_1d(axes)
        if not names:
            axes[0].text(0.5, 0.5, "no records", ha="center", va="center")
            axes[0].set_axis_off()
        for name, ax in zip(names, axes):
            for split, style in (("train", "o-"), ("eval", "s--")):
                values = cols.get(f"{split}_{name}")
                if values is not None and finite[f"{split}_{name}"]:
                    ax.plot(
                        steps, values, style, label=_SPLIT_LABELS[split], markersize=3
                    )
            ax.set_xlabel("step")
            ax.set_ylabel(_YLABELS.get(name, name))
            ax.set_title(_TITLES.get(name, name))
            ax.grid(alpha=0.3)
            ax.legend()
            if name == "loss" and all(
                v > 0 for s in _SPLITS for v in cols.get(s + name, []) if v == v
            ):
                ax.set_yscale("log")
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
        return names


def _is_state(x: Any) -> bool:
    return isinstance(x, eqx.nn.State)


def _state_entries(state: eqx.nn.State) -> list[tuple[str, Any]]:
    """`(name, value)` of each entry of an `eqx.nn.State`, named after the layer
    that owns it.

    `eqx.nn.make_with_state` keys each entry by the stringified path of its
    `StateIndex` in the model (`"DnCNN.blocks[0].norm.batch_state_index"`); the
    name is that path without the model's class (`.blocks[0].norm...`), and an
    `eqx.nn.BatchNorm`'s `(mean, var)` pair is named `.mean` and `.var`, as Flax
    names its batch statistics. A key that is not such a path (a `State` built
    another way) gives `[<i>]`, the entry's position.
    """
    values, keys = state.tree_flatten()
    entries = []
    for i, (key, value) in enumerate(zip(keys, values)):
        name = re.sub(r"^[^.\[]*", "", key) if isinstance(key, str) else ""
        name = name if name[:1] in (".", "[") else f"[{i}]"
        if name.endswith(".batch_state_index") and isinstance(value, tuple):
            base = name[: -len(".batch_state_index")]
            if len(value) == 2:
                entries += [(base + ".mean", value[0]), (base + ".var", value[1])]
                continue
        entries.append((name, value))
    return entries


def _named_arrays(tree: PyTree, prefix: str = "") -> list[tuple[str, Any]]:
    """`(name, array)` for each array leaf of `tree`, `eqx.nn.State`s included."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_state)[0]:
        name = prefix + jax.tree_util.keystr(path)
        if _is_state(leaf):
            for entry, value in _state_entries(leaf):
                out += _named_arrays(value, name + entry)
        elif eqx.is_array(leaf):
            out.append((name, leaf))
    return out


def parameter_overview(tree: PyTree) -> str:
    """A table of the array leaves of a PyTree: name, shape, size, mean and std.

    As SCICO's `get_parameter_overview`, for Equinox models and their state:
    a model's leaves are named by their path (`blocks[0].norm.weight`), an
    `eqx.nn.State`'s after the layer that owns them (`blocks[0].norm.mean`,
    `blocks[0].norm.var`, `blocks[0].norm.batch_counter`).

    **Arguments:**

    - `tree`: a model, an `eqx.nn.State` or any PyTree.

    **Returns:**

    The table as text, with the total number of entries on the last line
    (`Total weights: 37,696`, as SCICO's).
    """
    rows = []
    leaves = _named_arrays(tree)
    for name, leaf in leaves:
        arr = np.asarray(leaf)
        if arr.dtype.kind == "f" and arr.size:
            stats = (f"{arr.mean():.3g}", f"{arr.std():.3g}")
        else:
            stats = ("", "")
        rows.append((name.lstrip("."), str(arr.shape), f"{arr.size:,}", *stats))
    header = ("Name", "Shape", "Size", "Mean", "Std")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    total = sum(np.size(x) for _, x in leaves)
    out = [sep, line(header), sep, *map(line, rows), sep, f"Total weights: {total:,}"]
    return "\n".join(out)

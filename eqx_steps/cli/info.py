"""`eqx-steps info RUN_DIR`: configuration, parameters and last metrics of a run."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._validate import check_int
from . import _run_folder as folder
from ._errors import reported
from ._models import build_model, resolve
from ._runtime import start_jax
from ._settings import DEFAULTS, saved_settings
from .train import trainer_config


def add_parser(commands: Any, formatter: Any) -> None:
    """Add the `info` command to the subparsers `commands`."""
    parser = commands.add_parser(
        "info",
        help="configuration, parameters and last metrics of a run",
        description="Print the configuration of RUN_DIR, the parameter overview of "
        "its latest checkpoint and its last metrics record.",
        formatter_class=formatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.set_defaults(run=run)


def _record_line(record: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in record.items()
    )


def _restore_printed(
    settings: dict[str, Any], model: Any, model_state: Any, run_dir: str
) -> tuple[int, Any, Any] | None:
    """`(step, model, model_state)` of the run's latest checkpoint, or `None`
    when it has none.

    Only what `info` prints is read: the optimizer state's leaves (two more
    copies of the parameters with Adam) are left on disk (orbax placeholders in
    the restore target), and the arrays come back to the first local device.
    """
    import equinox as eqx
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    from .._checkpoint_parts import _is_key, _orbax_name, _STATE, _workdir
    from ..apply import _restore_state
    from ..checkpoint import latest_step

    path = _workdir(run_dir)
    step = latest_step(path)
    if step is None:
        return None
    # The structure of the saved state: the run's initial state (not read).
    config = trainer_config(settings, run_dir)
    _, state = _restore_state(config, model, model_state, use_checkpoint=False)
    arrays = eqx.filter(state, eqx.is_array)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def wanted(x):
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device)

    # Partial restore of a nested dict of orbax's names (custom nodes do not
    # trim): the optimizer state's leaves are left out of the target.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        arrays.replace(opt_state=None)
    )
    item: dict[str, Any] = {}
    # orbax stores lists, and nodes flattened without keys, as lists.
    FlatKey = jax.tree_util.FlattenedIndexKey
    sequences: set[tuple[str, ...]] = set()
    for p, x in leaves:
        names = _orbax_name(p)
        node = item
        for i, k in enumerate(names[:-1]):
            node = node.setdefault(k, {})
            if isinstance(p[i + 1], (jax.tree_util.SequenceKey, FlatKey)):
                sequences.add(names[: i + 1])
        node[names[-1]] = wanted(x)

    def as_lists(node: Any, at: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: as_lists(v, (*at, k)) for k, v in node.items()}
        return [node[str(i)] for i in range(len(node))] if at in sequences else node

    item = as_lists(item, ())
    restore_args = jax.tree_util.tree_map(
        lambda x: ocp.ArrayRestoreArgs(sharding=one_device), item
    )
    with reported(f"checkpoint step {step} in {run_dir}: "):
        got = ocp.PyTreeCheckpointHandler().restore(
            epath.Path(path / str(step) / _STATE),
            args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True
            ),
        )

    def read(p):
        node = got
        for k in _orbax_name(p):
            node = node[int(k)] if isinstance(node, list) else node[k]
        return node

    restored = jax.tree_util.tree_unflatten(treedef, [read(p) for p, _ in leaves])
    restored = eqx.combine(restored, state)
    return int(restored.step), restored.model, restored.model_state


def run(args: argparse.Namespace) -> int:
    """Run `eqx-steps info` with the parsed `args`; the exit status."""
    config = folder.read_config(args.run_dir)
    settings = resolve({**DEFAULTS, **saved_settings(config, folder.CONFIG_FILE)})
    start_jax(None, None)
    from ..trainer import parameter_overview

    print(f"Run folder: {args.run_dir}")
    print(f"Configuration ({folder.CONFIG_FILE}):")
    width = max(map(len, config), default=0)
    for k, v in config.items():
        print(f"  {k:<{width}}  {json.dumps(v)}")
    if settings["task"] != "denoise":
        from ._tasks import describe, INVERSE_MODELS, model_line

        print(f"Task: {describe(settings)}, noise std {settings['noise']:g}")
        if settings["model"] in INVERSE_MODELS:
            print(f"Network: {settings['model']}, {model_line(settings)}")
    with reported(f"{folder.CONFIG_FILE}: "):
        channels = check_int("channels", config.get("channels", 1))
    model, model_state = build_model(settings, channels)
    found = _restore_printed(settings, model, model_state, args.run_dir)
    if found is None:
        print("No checkpoint: the parameters of the initial model.")
    else:
        step, model, model_state = found
        print(f"Parameters at checkpoint step {step}:")
    print(parameter_overview(model))
    if model_state is not None:
        print("Batch-norm statistics:")
        print(parameter_overview(model_state))
    records = folder.read_metrics(args.run_dir)
    if records:
        print(f"Last metrics record ({folder.METRICS_FILE}, {len(records)} records):")
        print("  " + _record_line(records[-1]))
        last = records[-1]
        if isinstance(last.get("eval_snr"), float):
            print(
                f"Test SNR {last['eval_snr']:.2f} dB at step {last.get('step')} "
                "(eval_snr: SCICO's evaluation, as `eqx-steps evaluate` prints it)"
            )
    else:
        print(f"No metrics records ({folder.METRICS_FILE} is missing or empty).")
    return 0

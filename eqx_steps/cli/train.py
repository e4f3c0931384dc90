"""`eqx-steps train`: train a denoiser and write a run folder."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Any, NoReturn

from . import _run_folder as folder, _task_data as task_data, _tasks as tasks
from ._config_file import read_config_file
from ._data import Data, load_data
from ._errors import one_line, reported, UsageError
from ._models import build_model, resolve
from ._report import plural, report
from ._runtime import distributed_args, host, is_main_process, start_jax
from ._settings import BY_NAME, DEFAULTS, SETTINGS


# ~15 log points over a run (each evaluates the whole test set).
_LOG_POINTS = 15


def add_parser(commands: Any, formatter: Any) -> None:
    """Add the `train` command to the subparsers `commands`."""
    parser = commands.add_parser(
        "train",
        help="train a denoiser and write a run folder",
        description="Train a denoiser (noisy -> clean) on synthetic patches, or on "
        "your own images with --data, on all local devices, with a progress bar. "
        "The run folder gets config.json, metrics.jsonl, orbax checkpoints, "
        "curves.png and samples.png; the test SNR (SCICO's eval_snr, as in the "
        "log and the curves), PSNR and MSE of the noisy input and of the output "
        "are printed at the end.",
        formatter_class=formatter,
    )
    for s in SETTINGS:
        s.add_to(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint, with its saved "
        "settings (options given here override them, e.g. more --epochs)",
    )
    parser.add_argument(
        "--fallback",
        action="store_true",
        help="with --resume: when the latest checkpoint is corrupt, continue from "
        "the newest older one that is not (default: stop with an error)",
    )
    parser.add_argument(
        "--tensorboard",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also write TensorBoard event files (metrics, learning rate, the "
        "settings, samples.png at the end) to DIR (default: RUN_DIR/tensorboard); "
        'needs tensorboardX: pip install "eqx_steps[tensorboard]"',
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML or JSON file of settings with the keys of these options (e.g. "
        '{"model": "unet", "epochs": 5}); command-line options override it',
    )
    parser.set_defaults(run=run)


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], str, Any]:
    """The run's settings (saved < config file < options), folder and job."""
    if args.fallback and not args.resume:
        raise UsageError("--fallback goes with --resume: it chooses the checkpoint")
    given = {k: v for k, v in vars(args).items() if k in BY_NAME and v is not None}
    from_file = read_config_file(args.config) if args.config else {}
    out = given.get("out", from_file.get("out"))
    distributed = distributed_args({**from_file, **given})
    saved: dict[str, Any] = {}
    if args.resume:
        if out is None:
            raise UsageError("--resume needs --out RUN_DIR, the run to continue")
        saved = folder.read_settings(out)
    elif out is not None:
        folder.check_new(out)
    if out is None:
        if distributed is not None:
            raise UsageError(
                "a multi-process run needs --out: every process must name the same "
                "run folder"
            )
        out = folder.default_out(given.get("model", from_file.get("model", "dncnn")))
    settings = resolve({**DEFAULTS, **saved, **from_file, **given})
    if settings["data"] is not None:
        settings["data"] = os.path.abspath(settings["data"])
    if distributed is not None:
        if settings["backend"] == "pmap":
            raise UsageError(
                "--backend pmap cannot run across processes; use --backend sharded"
            )
        settings["backend"] = "sharded"
    elif settings["backend"] is None:
        settings["backend"] = "pmap"
    return settings, out, distributed


def trainer_config(settings: dict[str, Any], workdir: str) -> dict[str, Any]:
    """The `BasicTrainer` configuration of a run (JSON values only)."""
    steps_per_epoch = max(1, settings["train_size"] // settings["batch_size"])
    num_steps = steps_per_epoch * settings["epochs"]
    return {
        "seed": settings["seed"],
        "batch_size": settings["batch_size"],
        "num_epochs": settings["epochs"],
        "base_learning_rate": settings["lr"],
        "log": True,
        "workdir": workdir,
        "checkpointing": True,
        "backend": settings["backend"],
        "steps_per_call": settings["steps_per_call"],
        "log_every_steps": max(1, -(-num_steps // _LOG_POINTS)),
        # A checkpoint per epoch (the trainer also saves the last step).
        "steps_per_checkpoint": steps_per_epoch,
    }


def _make_trainer(
    settings: dict[str, Any], data: Data, workdir: str, created: bool, fallback: bool
) -> tuple[Any, str]:
    """The `BasicTrainer` and why it starts where it does; a refused run leaves
    no folder behind."""
    from ..checkpoint import CheckpointFallbackWarning
    from ..trainer import BasicTrainer

    model, model_state = build_model(settings, data.channels)
    # deblur/ct: SCICO's two-stage MoDL (stage 1 first), clip_positive on the
    # networks' positive weights.
    model, model_state = tasks.first_stage(
        settings, data, workdir, model, model_state, trainer_config
    )
    config: dict[str, Any] = trainer_config(settings, workdir)
    if data.train_step_fn is not None:
        config["train_step_fn"] = data.train_step_fn
    if (post_lst := tasks.post_processing(settings)) is not None:
        config["post_lst"] = post_lst
    try:
        with reported(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointFallbackWarning)
            trainer = BasicTrainer(
                config,
                model,
                data.train,
                data.test,
                model_state=model_state,
                fallback=fallback,
            )
    except (UsageError, *_pipeline_errors(data)) as e:  # the first batch, too
        if created and is_main_process():
            folder.remove_if_empty(workdir)
        if isinstance(e, UsageError):
            raise
        raise UsageError(one_line(e)) from None
    why = "the latest complete checkpoint"
    for w in caught:
        if issubclass(w.category, CheckpointFallbackWarning):
            why = f"--fallback {one_line(str(w.message))}"
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return trainer, why


def _open_folder(
    workdir: str, multi_process: bool, stack: contextlib.ExitStack
) -> bool:
    """Create the run folder, check it is writable and hold its lock (process 0;
    before the trainer looks for checkpoints in it, so that every process sees
    the same thing); whether it is new."""
    created = False
    if is_main_process():
        created = folder.create(workdir)
        stack.enter_context(folder.hold(workdir))
    if multi_process:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("eqx-steps: run folder ready")
    return created


def _header(settings: dict[str, Any], data: Data, trainer: Any, out: str) -> str:
    import jax

    devices = jax.devices()
    start = int(host(trainer.state.step))
    return (
        f"eqx-steps train: {settings['model']} (depth {settings['depth']}, "
        f"{settings['filters']} filters, {data.channels} channel(s)) on "
        f"{len(devices)} {devices[0].platform} device(s) in {jax.process_count()} "
        f"process(es), backend {settings['backend']}\n"
        f"  data: {data.description}\n"
        f"  {settings['train_size']} training / {settings['test_size']} test "
        f"patches of {settings['patch']}x{settings['patch']}, noise std "
        f"{settings['noise']:g}\n"
        f"  {plural(settings['epochs'], 'epoch')} x "
        f"{plural(trainer.steps_per_epoch, 'step')} of batch "
        f"{settings['batch_size']}, lr {settings['lr']:g}"
        + (f", resuming at step {start}" if start else "")
        + f"\n  run folder: {out}"
        + _task_lines(settings)
    )


def _task_lines(settings: dict[str, Any]) -> str:
    """The task and the network's sizes (deblur, ct), for the header."""
    if settings["task"] == "denoise":
        return ""
    text = f"\n  task: {tasks.describe(settings)}"
    if settings["model"] in tasks.INVERSE_MODELS:
        text += f"\n  {settings['model']}: {tasks.model_line(settings)}"
    return text


def _run_config(settings: dict[str, Any], data: Data, workdir: str) -> dict:
    """What `config.json` holds: everything `evaluate` and `info` need."""
    import jax

    return {
        **{k: v for k, v in tasks.saved(settings).items() if BY_NAME[k].saved},
        **trainer_config(settings, workdir),
        "channels": data.channels,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
    }


def _finish(
    settings: dict[str, Any], data: Data, state: Any, history: Any, workdir: str
) -> str:
    """The pictures (process 0) and the final table of a finished run."""
    model, model_state = host((state.model, state.model_state))
    step = int(host(state.step))
    text, output, snrs = report(
        settings,
        data.test,
        model,
        model_state,
        settings["batch_size"],
        settings["backend"],
        step,
    )
    if is_main_process():
        folder.write_curves(workdir, history)
        title = (
            f"{settings['model']} after {step} steps, noise std "
            f"{settings['noise']:g} (the SNR of each patch)"
        )
        if settings["task"] != "denoise":
            title += f"\n{tasks.describe(settings)}"
        shown = {
            "image": task_data.reference(
                settings, data.test["image"], data.test["label"]
            ),
            "label": data.test["label"],
        }
        folder.write_samples(
            workdir, shown, output, snrs, title, names=tasks.names(settings)
        )
    return text


def _interrupted(error: Any, out: str) -> NoReturn:
    """Report a run stopped by SIGINT/SIGTERM on one line; exit 128 + the signal.

    After a second signal the process ends at once (`os._exit`: no waiting for
    the threads of a save in progress); the previous checkpoint is intact.
    """
    again = f"continue with eqx-steps train --out {out} --resume"
    if error.step is None:
        if is_main_process():
            print(
                f"interrupted again ({error.signal.name}): stopped at once without "
                f"a new checkpoint; the previous one is intact; {again}",
                file=sys.stderr,
                flush=True,
            )
        sys.stdout.flush()
        os._exit(error.exit_status)
    if is_main_process():
        print(
            f"interrupted at step {error.step}; checkpoint saved; {again}",
            file=sys.stderr,
            flush=True,
        )
    raise SystemExit(error.exit_status)


def _pipeline_errors(data: Data) -> tuple[type[BaseException], ...]:
    """The errors of a streamed training set's pipeline (none for arrays)."""
    if isinstance(data.train, dict):
        return ()
    from ..pipeline import PipelineError

    return (PipelineError,)


TENSORBOARD_DIR = "tensorboard"
"""The folder of `--tensorboard`'s event files in the run folder."""


def _tensorboard(
    args: argparse.Namespace, trainer: Any, config: dict[str, Any], workdir: str
) -> Any:
    """The TensorBoard hook of `--tensorboard [DIR]`, added to `trainer`, or
    `None` without the option."""
    if args.tensorboard is None:
        return None
    from .._tensorboard import tensorboard_hook

    logdir = args.tensorboard or os.path.join(workdir, TENSORBOARD_DIR)
    hook = tensorboard_hook(logdir, trainer.history, config=config)
    trainer.add_hook(hook, every=trainer.log_every_steps)
    return hook


def run(args: argparse.Namespace) -> int:
    """Run `eqx-steps train` with the parsed `args`; the exit status."""
    from ..trainer import TrainingInterrupted

    settings, out, distributed = _settings(args)
    if args.tensorboard is not None:  # refused before anything is written
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise UsageError(
                '--tensorboard needs tensorboardX: pip install "eqx_steps[tensorboard]"'
            ) from None
    start_jax(settings["devices"], distributed)
    main = is_main_process()
    workdir = os.path.abspath(out)
    data = load_data(settings)
    with contextlib.ExitStack() as stack:
        created = _open_folder(workdir, distributed is not None, stack)
        trainer, why = _make_trainer(settings, data, workdir, created, args.fallback)
        config = _run_config(settings, data, workdir)
        tensorboard = _tensorboard(args, trainer, config, workdir)
        if tensorboard is not None:
            stack.callback(tensorboard.close)
        if main:
            folder.write_config(workdir, config)
            start = int(host(trainer.state.step))
            if args.resume:
                print(
                    f"Resuming from step {start}: {why}."
                    if start
                    else f"No checkpoint in {out!r} yet: starting from step 0."
                )
            print(_header(settings, data, trainer, out), flush=True)
        try:
            state, history = trainer.train()
        except TrainingInterrupted as e:
            _interrupted(e, out)
        except KeyboardInterrupt:  # before the trainer's handlers were installed
            print("interrupted before training started", file=sys.stderr)
            raise SystemExit(130) from None
        except OSError as e:  # a checkpoint that could not be written
            raise UsageError(one_line(e)) from None
        except _pipeline_errors(data) as e:  # a bad image, a worker that died
            if main:
                print(
                    f"eqx-steps train: {one_line(e)}; the latest checkpoint is "
                    f"intact: continue with eqx-steps train --out {out} --resume",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(1) from None
        text = _finish(settings, data, state, history, workdir)
        if tensorboard is not None and main:
            tensorboard.add_image(
                "samples",
                os.path.join(workdir, folder.SAMPLES_FILE),
                int(host(state.step)),
            )
    if main:  # after the lock is released (and its file removed)
        print(text + "\n" + folder.contents_line(out), flush=True)
    return 0

"""eqx_steps: functional, Flax-free training steps and a trainer for Equinox models.

This file is the one list of the public API.


Names load on first use (PEP 562): `import eqx_steps` starts no JAX, Equinox or
orbax import, so that `eqx-steps --help` and its argument errors come at once.
The imports under `TYPE_CHECKING` below are the list: type checkers and the API
reference read them, and `__getattr__` loads each name's module when it is
first asked for.
"""

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from . import (
        denoise as denoise,
        distributed as distributed,
        images as images,
        models as models,
        operators as operators,
        pipeline as pipeline,
        platform as platform,
        synthetic as synthetic,
    )
    from ._collectives import BatchStatisticsWarning as BatchStatisticsWarning
    from ._config import ConfigDict as ConfigDict, TrainConfig as TrainConfig
    from ._forward import (
        per_example as per_example,
        per_example_args as per_example_args,
        per_example_kwargs as per_example_kwargs,
        whole_batch as whole_batch,
    )
    from ._history import History as History, parameter_overview as parameter_overview
    from ._hooks import StepInfo as StepInfo
    from ._tensorboard import (
        tensorboard_hook as tensorboard_hook,
        TensorBoardHook as TensorBoardHook,
    )
    from .apply import only_apply as only_apply, only_evaluate as only_evaluate
    from .checkpoint import (
        checkpoint_restore as checkpoint_restore,
        checkpoint_save as checkpoint_save,
        CheckpointFallbackWarning as CheckpointFallbackWarning,
        CorruptCheckpointError as CorruptCheckpointError,
        latest_step as latest_step,
        load_config as load_config,
        load_data_state as load_data_state,
        prepare_workdir as prepare_workdir,
    )
    from .data import (
        create_input_iter as create_input_iter,
        DeviceIter as DeviceIter,
        IterateData as IterateData,
    )
    from .evaluate import evaluate_dataset as evaluate_dataset
    from .losses import (
        cross_entropy_loss as cross_entropy_loss,
        mean_squared_error as mean_squared_error,
        mse_loss as mse_loss,
    )
    from .metrics import (
        classification_metrics as classification_metrics,
        compute_metrics as compute_metrics,
        psnr as psnr,
        snr as snr,
    )
    from .model_file import load_model as load_model, save_model as save_model
    from .parallel import (
        device_mesh as device_mesh,
        NonFiniteStepError as NonFiniteStepError,
        parallel_eval_step as parallel_eval_step,
        parallel_train_step as parallel_train_step,
        replicate as replicate,
        shard as shard,
        sync_model_state as sync_model_state,
        unreplicate as unreplicate,
    )
    from .postprocess import (
        clip_positive as clip_positive,
        clip_range as clip_range,
        construct_traversal as construct_traversal,
        estimate_spectral_norm as estimate_spectral_norm,
        exact_spectral_norm as exact_spectral_norm,
        path_to_str as path_to_str,
        spectral_normalization_conv as spectral_normalization_conv,
    )
    from .schedules import (
        as_schedule as as_schedule,
        create_cnst_lr_schedule as create_cnst_lr_schedule,
        create_cosine_lr_schedule as create_cosine_lr_schedule,
        create_exp_lr_schedule as create_exp_lr_schedule,
    )
    from .state import (
        BATCH_AXIS as BATCH_AXIS,
        create_basic_train_state as create_basic_train_state,
        DEVICE_AXIS as DEVICE_AXIS,
        TrainState as TrainState,
    )
    from .steps import (
        eval_step as eval_step,
        train_step as train_step,
        train_step_post as train_step_post,
    )
    from .trainer import (
        BasicTrainer as BasicTrainer,
        TrainingInterrupted as TrainingInterrupted,
    )


def _exports() -> dict[str, tuple[str, str | None]]:
    """`{name: (module, attribute)}` from the imports above (read, not run);
    `attribute` is `None` for a submodule."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(__file__).read_text())
    guard = next(
        n
        for n in tree.body
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test)
    )
    names: dict[str, tuple[str, str | None]] = {}
    for node in guard.body:
        assert isinstance(node, ast.ImportFrom)
        for alias in node.names:
            if node.module is None:  # from . import denoise as denoise
                names[alias.asname or alias.name] = ("." + alias.name, None)
            else:
                names[alias.asname or alias.name] = ("." + node.module, alias.name)
    return names


_EXPORTS: dict[str, tuple[str, str | None]] | None = None


def __getattr__(name: str):
    global _EXPORTS
    import importlib

    if _EXPORTS is None:
        _EXPORTS = _exports()
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module, __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    global _EXPORTS
    if _EXPORTS is None:
        _EXPORTS = _exports()
    # The public names (and the module's own dunders), not this file's helpers.
    return sorted({*_EXPORTS, *(n for n in globals() if n.startswith("__"))})


__version__ = "0.1.0"

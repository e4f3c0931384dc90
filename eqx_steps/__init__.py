"""eqx_steps: functional, Flax-free training steps and a trainer for Equinox models.

This file is the one list of the public API.
"""

from . import distributed as distributed, models as models
from .apply import only_apply as only_apply, only_evaluate as only_evaluate
from .checkpoint import (
    checkpoint_restore as checkpoint_restore,
    checkpoint_save as checkpoint_save,
    load_model as load_model,
    save_model as save_model,
)
from .data import create_input_iter as create_input_iter, IterateData as IterateData
from .losses import mse_loss as mse_loss
from .metrics import compute_metrics as compute_metrics, psnr as psnr, snr as snr
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
    spectral_normalization_conv as spectral_normalization_conv,
)
from .schedules import (
    create_cnst_lr_schedule as create_cnst_lr_schedule,
    create_cosine_lr_schedule as create_cosine_lr_schedule,
    create_exp_lr_schedule as create_exp_lr_schedule,
)
from .state import (
    BATCH_AXIS as BATCH_AXIS,
    create_basic_train_state as create_basic_train_state,
    DEVICE_AXIS as DEVICE_AXIS,
    per_example as per_example,
    TrainState as TrainState,
    whole_batch as whole_batch,
)
from .steps import (
    eval_step as eval_step,
    train_step as train_step,
    train_step_post as train_step_post,
)
from .trainer import (
    BasicTrainer as BasicTrainer,
    ConfigDict as ConfigDict,
    evaluate_dataset as evaluate_dataset,
    History as History,
    parameter_overview as parameter_overview,
    TrainConfig as TrainConfig,
)


__version__ = "0.1.0"

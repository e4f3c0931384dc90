"""The denoisers the command trains: their names, default depths, construction and
restoration from a run folder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._errors import reported, UsageError


MODELS = ("dncnn", "convbn", "resnet", "unet", "modl", "odp")
MODEL_DEPTH = {"dncnn": 6, "convbn": 6, "resnet": 6, "unet": 3, "modl": 2, "odp": 2}
"""The default `--depth` of each model (UNet: levels, each halving the size;
MoDL: iterations; ODP: blocks, as SCICO's deblurring examples)."""


def resolve(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with the model-dependent defaults filled in, and checked.

    **Arguments:**

    - `settings`: every setting (`depth` may be `None`).

    **Returns:**

    A new dict with `depth` and the task's defaults set
    (`_tasks.resolve_task`).

    **Raises:**

    `UsageError` when a UNet's patch size does not halve `depth - 1` times, or
    options of the task do not go together.
    """
    from ._tasks import resolve_task

    settings = resolve_task(settings)
    if settings.get("depth") is None:
        settings["depth"] = MODEL_DEPTH[settings["model"]]
    if settings["model"] == "unet":
        factor = 2 ** (settings["depth"] - 1)
        if settings["patch"] % factor:
            raise UsageError(
                f"--patch {settings['patch']} is not divisible by 2**(depth-1) = "
                f"{factor}, which unet with --depth {settings['depth']} needs; use "
                f"--patch {max(factor, settings['patch'] // factor * factor)} or "
                "a smaller --depth"
            )
    return settings


def build_model(settings: Mapping[str, Any], channels: int) -> tuple[Any, Any]:
    """The initial model and its state (`eqx.nn.make_with_state`), seeded.

    **Arguments:**

    - `settings`: the resolved settings (`model`, `depth`, `filters`, `seed`).
    - `channels`: the image channels (1 grayscale, 3 colour).

    **Returns:**

    `(model, model_state)`.
    """
    import equinox as eqx
    import jax

    from .. import models

    if settings["model"] in ("modl", "odp"):
        from ._tasks import build_inverse_model

        return build_inverse_model(settings, channels)
    cls = {
        "dncnn": models.DnCNN,
        "convbn": models.ConvBNNet,
        "resnet": models.ResNet,
        "unet": models.UNet,
    }[settings["model"]]
    key = jax.random.fold_in(jax.random.key(settings["seed"]), 1)
    with reported(f"{settings['model']}: "):
        return eqx.nn.make_with_state(cls)(
            depth=settings["depth"],
            channels=channels,
            num_filters=settings["filters"],
            key=key,
        )


def restore(
    train_config: Mapping[str, Any], model: Any, model_state: Any, run_dir: str
) -> Any:
    """The latest checkpoint of `run_dir`, as the `TrainState` training saved.

    **Arguments:**

    - `train_config`: the run's trainer configuration (its optimizer fixes the
        structure of the checkpoint).
    - `model`, `model_state`: a model of the run's structure, e.g. the initial one.
    - `run_dir`: the run folder.

    **Returns:**

    The restored `TrainState`, or `None` when `run_dir` holds no checkpoint.

    **Raises:**

    `UsageError` when the checkpoint does not match the model or is corrupt.
    """
    from ..apply import _restore_state

    with reported():
        try:
            return _restore_state(train_config, model, model_state, run_dir)[1]
        except FileNotFoundError:
            return None

"""The tasks of the command: denoising, deblurring and CT.

- `denoise`: noisy image -> clean image (the command's first task; nothing here
    changes it).
- `deblur`: a blurred, noisy image `y = A x + noise` -> `x`, `A` a circular
    convolution ([`eqx_steps.operators.CircularConvolve`][]) with a uniform or
    Gaussian PSF, as SCICO's `deconv_*_train_foam1.py` examples.
- `ct`: a sinogram `y = A x + noise` -> `x`, `A` SCICO's normalised
    parallel-beam projector (`XRayTransform2D(..., det_count=int(N * 1.05 /
    sqrt(2)), dx=1 / sqrt(2)) / N` over `linspace(0, pi, angles)`), as SCICO's
    `ct_*_train_foam2.py` examples.

The model-based networks MoDL and ODP ([`eqx_steps.models.MoDLNet`][],
[`eqx_steps.models.ODPNet`][]) carry the operator; a plain CNN (DnCNN, UNet, ...)
may also learn to deblur (it maps the blurred image to the image). Synthetic data
are foam phantoms ([`eqx_steps.synthetic.make_foam`][]); `--data PATH` gives the
images instead. The noise of the measurements is drawn once (seeded), for the
training and the test set alike, so that `evaluate` rebuilds the same test set.

Everything the task needs is a function of the run's settings (`config.json`), so
`evaluate`, `info` and `restore` rebuild the same operator and model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._errors import reported, UsageError


TASKS = ("denoise", "deblur", "ct")
PSFS = ("uniform", "gaussian")
ODP_BLOCKS = ("deconv", "grad_desc", "denoise")
INVERSE_MODELS = ("modl", "odp")
TASK_NOISE = {"denoise": 0.2, "deblur": 20 / 255, "ct": 0.01}
"""The default `--noise` of each task (deblur: SCICO's examples' 20/255)."""
# SCICO's example scripts: clip_positive's floor for each model's weight.
POSITIVE_WEIGHT = {"modl": ("lmbda", 5e-4), "odp": ("alpha", 1e-3)}
BLOCK_DEPTH = {"modl": 4, "odp": 3}  # SCICO's examples
CG_ITER = 4  # SCICO's deconv_modl_train_foam1.py
OPERATOR_KEYS = (
    "psf",
    "psf_size",
    "psf_sigma",
    "angles",
    "det_count",
    "block_depth",
    "cg_iter",
    "block",
    "stage1_epochs",
    "stage1_cg_iter",
)
"""The settings of the deblur and ct tasks (not stored for a denoising run)."""
STAGE1_FOLDER = "stage1"
"""Where the first stage of SCICO's two-stage MoDL recipe keeps its checkpoints."""


def det_count(patch: int) -> int:
    """SCICO's CT examples' detector count for `patch x patch` images."""
    return max(1, int(patch * 1.05 / math.sqrt(2.0)))


def resolve_task(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with the task's defaults filled in, checked together.

    **Raises:**

    `UsageError` naming the options that do not go together (a model-based
    network without an operator, a CNN for CT, a PSF larger than the patch, ...).
    """
    s = dict(settings)
    task, model = s.get("task") or "denoise", s["model"]
    s["task"] = task
    if s.get("noise") is None:
        s["noise"] = TASK_NOISE[task]
    inverse = model in INVERSE_MODELS
    if task == "denoise":
        if inverse:
            raise UsageError(
                f"--model {model} needs a forward operator: use --task deblur or "
                "--task ct (a denoiser is --model dncnn, convbn, resnet or unet)"
            )
    elif task == "ct" and not inverse:
        raise UsageError(
            f"--task ct maps a sinogram to an image, which --model {model} cannot: "
            "use --model modl or --model odp"
        )
    if task == "deblur" and s["psf_size"] > s["patch"]:
        raise UsageError(
            f"--psf-size {s['psf_size']} is larger than --patch {s['patch']}: the "
            f"blur kernel must fit in the image; use --psf-size {s['patch']} or "
            f"less, or --patch {s['psf_size']} or more"
        )
    if task == "ct" and s.get("det_count") is None:
        s["det_count"] = det_count(s["patch"])
    if inverse:
        if s.get("block_depth") is None:
            s["block_depth"] = BLOCK_DEPTH[model]
        if s.get("cg_iter") is None:
            s["cg_iter"] = CG_ITER
        if model == "odp":
            if s.get("block") is None:
                s["block"] = "deconv" if task == "deblur" else "grad_desc"
            if s["block"] == "denoise":
                raise UsageError(
                    f"--block denoise is ODP's block for an identity operator, not "
                    f"for --task {task}: use --block "
                    + ("deconv or grad_desc" if task == "deblur" else "grad_desc")
                )
            if s["block"] == "deconv" and task != "deblur":
                raise UsageError(
                    "--block deconv needs a circular convolution (--task deblur); "
                    "for --task ct use --block grad_desc"
                )
    if s.get("stage1_epochs"):
        if model != "modl":
            raise UsageError(
                f"--stage1-epochs is SCICO's two-stage recipe for MoDL; --model "
                f"{model} trains in one stage: leave it out, or use --model modl"
            )
        if s.get("stage1_cg_iter") is None:
            s["stage1_cg_iter"] = s["cg_iter"]
    return s


def saved(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What `config.json` keeps of `settings`: the settings of the run's task and
    network only (a denoising run keeps no operator settings, a deblurring run
    no CT settings, ...)."""
    task, model = settings.get("task", "denoise"), settings.get("model")
    keep = {
        "deblur": {"psf", "psf_size", "psf_sigma"},
        "ct": {"angles", "det_count"},
    }.get(task, set())
    if model == "modl":
        keep |= {"block_depth", "cg_iter", "stage1_epochs"}
        if settings.get("stage1_epochs"):
            keep.add("stage1_cg_iter")
    elif model == "odp":
        keep |= {"block_depth", "block"}
    return {k: v for k, v in settings.items() if k not in OPERATOR_KEYS or k in keep}


def describe(settings: Mapping[str, Any]) -> str:
    """The task and its operator in words, e.g. `deblur, 3x3 uniform PSF`."""
    task = settings.get("task", "denoise")
    if task == "deblur":
        k = settings["psf_size"]
        kind = (
            f"Gaussian PSF (sigma {settings['psf_sigma']:g})"
            if settings["psf"] == "gaussian"
            else "uniform PSF"
        )
        return f"deblur, {k}x{k} {kind}"
    if task == "ct":
        return (
            f"ct, {settings['angles']} angles over [0, pi], {settings['det_count']} "
            "detector bins"
        )
    return "denoise"


def model_line(settings: Mapping[str, Any]) -> str:
    """The network's sizes in words, for a model-based network."""
    model = settings["model"]
    if model == "modl":
        text = (
            f"depth {settings['depth']}, block depth {settings['block_depth']}, "
            f"cg_iter {settings['cg_iter']}"
        )
        if settings.get("stage1_epochs"):
            text += (
                f"; stage 1: {settings['stage1_epochs']} epoch(s) at depth 1, "
                f"cg_iter {settings['stage1_cg_iter']}"
            )
        return text
    return (
        f"depth {settings['depth']}, block depth {settings['block_depth']}, "
        f"{settings['block']} blocks"
    )


def psf(settings: Mapping[str, Any]) -> np.ndarray:
    """The blur kernel: uniform (SCICO's examples) or Gaussian, summing to 1."""
    k = settings["psf_size"]
    if settings["psf"] == "uniform":
        return np.full((k, k), 1.0 / (k * k), np.float32)
    t = np.arange(k) - (k - 1) / 2
    g = np.exp(-(t**2) / (2 * settings["psf_sigma"] ** 2))
    kernel = np.outer(g, g)
    return (kernel / kernel.sum()).astype(np.float32)


def make_operator(settings: Mapping[str, Any], shape: tuple[int, ...]) -> Any:
    """The task's forward operator on one image of `shape` (`(H, W)`, or
    `(H, W, C)` for a colour image to deblur channel by channel)."""
    from ..operators import CircularConvolve, XRayTransform2D

    task = settings["task"]
    with reported():
        if task == "deblur":
            kernel = psf(settings)
            if len(shape) == 3:  # one kernel per channel: identity along channels
                kernel = kernel[..., None]
            return CircularConvolve(kernel, shape)
        if task == "ct":
            if len(shape) != 2 or shape[0] != shape[1]:
                raise UsageError(
                    f"--task ct reconstructs square grayscale images, not {shape}"
                )
            n = shape[0]
            angles = np.linspace(0, np.pi, settings["angles"])
            xray = XRayTransform2D(
                (n, n), angles, det_count=settings["det_count"], dx=1 / math.sqrt(2)
            )
            return _scaled(xray, 1.0 / n)
    raise ValueError(f"the task {task!r} has no operator")


def _scaled(op: Any, scale: float) -> Any:
    """`scale * op` (SCICO's CT examples normalise the projector by `1 / N`)."""
    from ._scaled import ScaledOperator

    return ScaledOperator(op, scale)


def _image_shape(patch: int, channels: int) -> tuple[int, ...]:
    return (patch, patch) if channels == 1 else (patch, patch, channels)


def build_inverse_model(
    settings: Mapping[str, Any],
    channels: int,
    shape: tuple[int, ...] | None = None,
) -> tuple[Any, Any]:
    """A MoDL or ODP network for the run's task and its state, seeded.

    **Arguments:**

    - `settings`: the resolved settings.
    - `channels`: the image channels.
    - `shape`: the image shape the operator is built for (default `--patch`
        square).
    """
    import equinox as eqx
    import jax

    from ..models import MoDLNet, ODPNet

    op = make_operator(settings, shape or _image_shape(settings["patch"], channels))
    key = jax.random.fold_in(jax.random.key(settings["seed"]), 1)
    with reported(f"{settings['model']}: "):
        if settings["model"] == "modl":
            return eqx.nn.make_with_state(MoDLNet)(
                op,
                settings["depth"],
                channels,
                settings["filters"],
                settings["block_depth"],
                settings["cg_iter"],
                key=key,
            )
        return eqx.nn.make_with_state(ODPNet)(
            op,
            settings["depth"],
            channels,
            settings["filters"],
            settings["block_depth"],
            block=settings["block"],
            key=key,
        )


def post_processing(settings: Mapping[str, Any]) -> list[Any] | None:
    """`post_lst` of the training step: SCICO's `clip_positive` on MoDL's `lmbda`
    (floor 5e-4) or ODP's `alpha` (1e-3); `None` for other models."""
    import functools

    from ..postprocess import clip_positive, construct_traversal

    if settings["model"] not in POSITIVE_WEIGHT:
        return None
    name, floor = POSITIVE_WEIGHT[settings["model"]]
    return [
        functools.partial(
            clip_positive, traversal=construct_traversal(name), minval=floor
        )
    ]


def names(settings: Mapping[str, Any]) -> tuple[str, str, str]:
    """The names of the truth, the measurement and the output in tables and
    pictures."""
    task = settings.get("task", "denoise")
    if task == "deblur":
        return "truth", "blurred", "restored"
    if task == "ct":
        return "truth", "back-projection", "restored"
    return "clean", "noisy", "denoised"


# --- the two-stage MoDL recipe ----------------------------------------------------


def first_stage(
    settings: Mapping[str, Any],
    data: Any,
    workdir: str,
    model: Any,
    model_state: Any,
    trainer_config: Any,
) -> tuple[Any, Any]:
    """SCICO's first stage of MoDL: `--stage1-epochs` epochs at depth 1 (with
    `--stage1-cg-iter`), in `RUN_DIR/stage1`; the returned model is that one at
    the full `--depth` and `--cg-iter` (its weights, via `with_depth`), to train
    in the run folder. A run whose second stage has started (a checkpoint in the
    run folder) skips it: its checkpoint holds the weights.
    """
    from ..trainer import BasicTrainer
    from . import _run_folder as folder
    from ._runtime import host, is_main_process

    if not settings.get("stage1_epochs") or folder.step_folders(workdir):
        return model, model_state
    stage = {
        **settings,
        "epochs": settings["stage1_epochs"],
        "depth": 1,
        "cg_iter": settings["stage1_cg_iter"],
    }
    stage_dir = os.path.join(workdir, STAGE1_FOLDER)
    if is_main_process():
        folder.create(stage_dir)
        print(
            f"eqx-steps train: stage 1 of SCICO's two-stage MoDL: depth 1, cg_iter "
            f"{stage['cg_iter']}, {stage['epochs']} epoch(s), checkpoints in "
            f"{stage_dir}",
            flush=True,
        )
    m1, s1 = build_inverse_model(stage, data.channels)
    config = trainer_config(stage, stage_dir)
    config["post_lst"] = post_processing(stage)
    with reported():
        trainer = BasicTrainer(config, m1, data.train, data.test, model_state=s1)
    state, _ = trainer.train()
    trained, trained_state = host((state.model, state.model_state))
    deeper = trained.with_depth(settings["depth"], cg_iter=settings["cg_iter"])
    if is_main_process():
        print(
            f"eqx-steps train: stage 2: depth {settings['depth']}, cg_iter "
            f"{settings['cg_iter']}, from stage 1's weights",
            flush=True,
        )
    return deeper, trained_state


def at_shape(
    settings: Mapping[str, Any], model: Any, channels: int, shape: tuple[int, ...]
) -> Any:
    """A trained MoDL/ODP `model` with its operator rebuilt for images of
    `shape` (deblurring: the blur is the same at any size; ODP's norm estimate
    is recomputed for the new size, as SCICO computes it at every call). The
    weights are the trained ones; other models are returned as they are."""
    import jax

    if settings["model"] not in INVERSE_MODELS or model.operator.input_shape == shape:
        return model
    fresh, _ = build_inverse_model(settings, channels, shape)
    trained = jax.tree_util.tree_leaves(model)
    leaves, treedef = jax.tree_util.tree_flatten(fresh)
    assert [np.shape(x) for x in trained] == [np.shape(x) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, trained)

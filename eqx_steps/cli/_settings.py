"""The settings of a training run: one table for the options, config files
(`_config_file.py`) and `config.json`."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any

from .._validate import check_int, check_number
from ._errors import UsageError
from ._models import MODEL_DEPTH, MODELS
from ._tasks import ODP_BLOCKS, PSFS, TASKS


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its key (config files, `config.json`), option and check."""

    name: str  # the key; the option is --name-with-dashes
    kind: type  # int, float, str, or bool (a flag on the command line)
    default: Any
    help: str
    minimum: float | None = None
    positive: bool = False  # > 0 rather than >= minimum
    choices: tuple[str, ...] = ()
    nullable: bool = False
    saved: bool = True  # a setting of the run, stored in config.json
    metavar: str | None = None  # the option's value in --help (default: NAME)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def _reason(self, error: Exception) -> str:
        """The message of a `_validate` check without its leading name."""
        return str(error).removeprefix(self.flag).lstrip(" =").rstrip(".")

    def check(self, value: Any, where: str) -> Any:
        """`value` validated; `where` names it in the message (`--epochs`, or
        `'epochs' in 'run.toml'`).

        **Raises:**

        `UsageError` saying what is wrong and what is expected.
        """
        if value is None and self.nullable:
            return None
        if self.choices:
            if value not in self.choices:
                close = difflib.get_close_matches(str(value), self.choices, n=1)
                raise UsageError(
                    f"{where} must be one of {', '.join(self.choices)}, got {value!r}"
                    + (f" (did you mean {close[0]!r}?)" if close else "")
                )
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise UsageError(f"{where} must be true or false, got {value!r}")
            return value
        try:
            if self.kind is int:
                bound = None if self.minimum is None else int(self.minimum)
                return check_int(self.flag, value, minimum=bound)
            if self.kind is float:
                return check_number(
                    self.flag, value, minimum=self.minimum, positive=self.positive
                )
            if not isinstance(value, str):
                raise TypeError(f"must be a string, got {value!r}")
            return value
        except TypeError as e:
            raise UsageError(
                f"{where} {self._reason(e)}; write it as {_KIND[self.kind]}"
                + (" (or null)" if self.nullable else "")
            ) from None
        except ValueError as e:
            raise UsageError(f"{where} {self._reason(e)}") from None

    def parse(self, text: str) -> Any:
        """Convert and validate a command-line string (argparse's `type=`)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {_KIND[self.kind]}, got {text!r}"
            ) from None
        try:
            return self.check(value, self.flag)
        except UsageError as e:
            raise argparse.ArgumentTypeError(
                str(e).removeprefix(self.flag + " ")
            ) from None

    def add_to(self, parser: argparse.ArgumentParser, text: str | None = None) -> None:
        """Add the option `--name` to `parser` (default `None`: not given), with
        the help `text` (default: the setting's)."""
        text = text or self.help
        if "(default:" not in text:
            text = f"{text} (default: {self.default})"
        if self.kind is bool:  # a flag: given means true
            parser.add_argument(self.flag, action="store_true", default=None, help=text)
            return
        metavar = self.metavar or self.name.upper()
        if self.choices:
            metavar = "{" + ",".join(self.choices) + "}"
        parser.add_argument(
            self.flag, type=self.parse, default=None, metavar=metavar, help=text
        )


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "model",
        str,
        "dncnn",
        "the network (modl and odp, SCICO's model-based networks, for --task "
        "deblur and ct)",
        choices=MODELS,
    ),
    Setting(
        "depth",
        int,
        None,
        "number of convolution layers (unet: levels, each halving the patch size; "
        "the patch must be divisible by 2**(depth-1); modl: iterations; odp: "
        "blocks) (default: "
        + ", ".join(f"{m} {d}" for m, d in MODEL_DEPTH.items())
        + ")",
        minimum=1,
        nullable=True,
    ),
    Setting("filters", int, 32, "filters of the hidden layers", minimum=1),
    Setting("epochs", int, 3, "training epochs (passes over the training set)", 1),
    Setting(
        "batch_size",
        int,
        16,
        "global batch size, split across the devices (a multiple of their count)",
        1,
    ),
    Setting("lr", float, 3e-3, "learning rate of Adam", positive=True),
    Setting(
        "data",
        str,
        None,
        "train on your own images: a folder of PNG/JPEG/TIFF files (streamed: "
        "images decoded as needed, fresh --patch patches every epoch), one image "
        "file, or an .npy/.npz array (values in [0, 1], or 8/16-bit; read into "
        "memory, patches cut once); fresh noise of std --noise at every step; one "
        "image in five (a single image: its bottom fifth) held out for the test "
        "set (default: synthetic phantoms)",
        nullable=True,
        metavar="PATH",
    ),
    Setting(
        "workers",
        int,
        0,
        "with --data FOLDER: Grain worker processes decoding the images (0: "
        "threads of this process); the patches do not depend on it",
        minimum=0,
    ),
    Setting(
        "augment",
        bool,
        False,
        "with --data FOLDER: turn and flip each training patch at random (one of "
        "the 8 symmetries of the square)",
    ),
    Setting(
        "on_bad_image",
        str,
        "skip",
        "with --data FOLDER: an image that cannot be read is skipped (with a note "
        "and counted) or stops the run, naming it",
        choices=("skip", "raise"),
    ),
    Setting(
        "noise",
        float,
        None,
        "standard deviation of the Gaussian noise added to the [0, 1] patches (to "
        "the measurements: the blurred images, the sinograms, for --task deblur, "
        "ct) (default: denoise 0.2, deblur 20/255 as SCICO's examples, ct 0.01)",
        positive=True,
        nullable=True,
    ),
    Setting("patch", int, 32, "patch height and width in pixels", minimum=1),
    Setting("train_size", int, 1024, "number of training patches", minimum=1),
    Setting("test_size", int, 128, "number of test patches", minimum=1),
    Setting("seed", int, 0, "seed of the data, the initialisation and the order", 0),
    Setting(
        "backend",
        str,
        None,
        "data-parallel backend: pmap (jax.pmap) or sharded (shard_map "
        "under jit; needed across processes) (default: pmap, or sharded for a "
        "multi-process run)",
        choices=("pmap", "sharded"),
        nullable=True,
    ),
    Setting(
        "steps_per_call",
        int,
        1,
        "training steps per dispatch (lax.scan of K steps)",
        minimum=1,
    ),
    Setting(
        "devices",
        int,
        None,
        "number of CPU devices to split the host into when there is no "
        "accelerator (a GPU/TPU run uses all local accelerators) (default: "
        "min(4, CPU cores), or the count already in XLA_FLAGS)",
        minimum=1,
        nullable=True,
    ),
    Setting(
        "out",
        str,
        None,
        "run folder (default: runs/<model>-<date>-<time>)",
        nullable=True,
        saved=False,
    ),
    Setting(
        "coordinator",
        str,
        None,
        "HOST:PORT of process 0's coordinator, for a multi-process run (default: "
        "$JAX_COORDINATOR_ADDRESS)",
        nullable=True,
        saved=False,
    ),
    Setting(
        "num_processes",
        int,
        None,
        "number of processes of a multi-process run (default: $JAX_NUM_PROCESSES)",
        minimum=1,
        nullable=True,
        saved=False,
    ),
    Setting(
        "process_id",
        int,
        None,
        "this process's index, 0 to num_processes-1 (default: $JAX_PROCESS_ID)",
        minimum=0,
        nullable=True,
        saved=False,
    ),
)
# The tasks of the command and their operators (eqx_steps.cli._tasks).
TASK_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "task",
        str,
        "denoise",
        "what the model learns: denoise (noisy -> clean), deblur (blurred and "
        "noisy -> clean, a circular convolution) or ct (sinogram -> image, a "
        "parallel-beam projector)",
        choices=TASKS,
    ),
    Setting("psf", str, "uniform", "the blur kernel of --task deblur", choices=PSFS),
    Setting(
        "psf_size",
        int,
        3,
        "height and width of the blur kernel (SCICO's examples: a 3x3 uniform kernel)",
        minimum=1,
    ),
    Setting(
        "psf_sigma",
        float,
        1.0,
        "standard deviation of the Gaussian blur kernel, in pixels",
        positive=True,
    ),
    Setting(
        "angles",
        int,
        45,
        "number of projection angles of --task ct, evenly spaced over [0, pi] "
        "(SCICO's CT examples: 45)",
        minimum=1,
    ),
    Setting(
        "det_count",
        int,
        None,
        "number of detector bins of --task ct (default: int(patch * 1.05 / "
        "sqrt(2)), as SCICO's CT examples)",
        minimum=1,
        nullable=True,
    ),
    Setting(
        "block_depth",
        int,
        None,
        "convolution layers of the ResNet inside modl and odp (default: modl 4, "
        "odp 3, as SCICO's examples)",
        minimum=1,
        nullable=True,
    ),
    Setting(
        "cg_iter",
        int,
        None,
        "conjugate-gradient iterations of each modl solve (default: 4)",
        minimum=0,
        nullable=True,
    ),
    Setting(
        "block",
        str,
        None,
        "the blocks of odp: deconv (a circular convolution), grad_desc (any "
        "operator) or denoise (default: deconv for deblur, grad_desc for ct)",
        choices=ODP_BLOCKS,
        nullable=True,
    ),
    Setting(
        "stage1_epochs",
        int,
        0,
        "SCICO's two-stage MoDL recipe: first train this many epochs at depth 1 "
        "(in RUN_DIR/stage1), then --epochs at --depth from those weights; 0: one "
        "stage",
        minimum=0,
    ),
    Setting(
        "stage1_cg_iter",
        int,
        None,
        "conjugate-gradient iterations of the first stage (default: --cg-iter)",
        minimum=0,
        nullable=True,
    ),
)
SETTINGS = SETTINGS + TASK_SETTINGS
BY_NAME = {s.name: s for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS}


def saved_settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    """The settings of a run among `values` (e.g. a `config.json`), validated."""
    return {
        s.name: s.check(values[s.name], f"{s.name!r} in {where}")
        for s in SETTINGS
        if s.saved and s.name in values
    }

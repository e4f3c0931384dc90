"""The training loop: `BasicTrainer`, SCICO's `BasicFlaxTrainer` for Equinox models.

`BasicTrainer` composes the pieces of this library: the data iterators
(`data.py`), the parallel steps (`parallel.py`), checkpoints (`checkpoint.py`).
Its configuration is a [`eqx_steps.TrainConfig`][] (or a dict of SCICO's keys,
validated into one). Its loop, `train()`, only runs the steps and calls hooks:
the records of the returned `History`, `metrics.jsonl`, the progress bar and the
checkpoints are hooks (`_hooks.py`), and users add their own with
[`eqx_steps.BasicTrainer.add_hook`][].
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
from jaxtyping import PRNGKeyArray, PyTree

from ._config import ConfigDict as ConfigDict, TrainConfig as TrainConfig
from ._forward import per_example, whole_batch
from ._history import (
    History as History,
    parameter_overview as parameter_overview,
)
from ._hooks import (
    Hook,
    StepInfo as StepInfo,
)
from ._preempt import StopRequests, TrainingInterrupted as TrainingInterrupted
from ._trainer_input import as_step_batch, TrainInput
from ._trainer_loop import METRICS_FILE as METRICS_FILE, run
from ._trainer_setup import (
    check_model,
    initial_state,
    train_fns,
    warn_unscaled_images,
    warn_unused_entries,
)
from ._validate import (
    check_dataset,
    check_divisible,
    check_int,
    is_grain,
)
from .data import create_input_iter
from .evaluate import evaluate_dataset
from .parallel import parallel_eval_step
from .schedules import as_schedule
from .state import TrainState


class BasicTrainer:
    """Train an Equinox model with data-parallel steps, as SCICO's `BasicFlaxTrainer`.

    Everything is set up and validated on construction (configuration, data,
    optimizer, the initial or restored state), so a bad input fails before any
    training starts; [`eqx_steps.BasicTrainer.train`][] runs the loop.

    **Attributes** (SCICO's): `state`, `steps_per_epoch`, `num_steps`,
    `batch_size`, `log_every_steps`, `steps_per_checkpoint`, `lr_schedule`,
    `ishape` (the shape of one input example, `train_ds["image"].shape[1:]`,
    `(H, W, C)` for images; for a tuple or dict input, the same tuple or dict
    of shapes; SCICO's holds the spatial part `(H, W)` only, to initialise a
    Flax model: see the migration guide),
    `train_dt_iter` and `eval_dt_iter` (the training iterator at the state's
    step, one batch per item, which `train()` draws from; one pass over the test
    set), and `history`.

    !!! example

        ```python
        model, model_state = eqx.nn.make_with_state(es.models.DnCNN)(
            depth=6, channels=1, num_filters=32, key=jax.random.key(0)
        )
        trainer = es.BasicTrainer(
            {"num_epochs": 5, "batch_size": 16, "log": True},
            model, train_ds, test_ds, model_state=model_state,
        )
        trainer.add_hook(lambda info: print(info.step), every=100)
        state, history = trainer.train()
        history.plot("curves.png")
        ```
    """

    def __init__(
        self,
        config: Mapping[str, Any] | TrainConfig,
        model: PyTree,
        train_ds: Mapping[str, Any] | Iterable[Mapping[str, Any]] | Any,
        test_ds: Mapping[str, Any] | Any | None = None,
        *,
        model_state: eqx.nn.State | None = None,
        key: PRNGKeyArray | None = None,
        trainable: Any = eqx.is_inexact_array,
        forward: Callable = per_example,
        tx: optax.GradientTransformation | None = None,
        fallback: bool = False,
    ):
        """**Arguments:**

        - `config`: a [`eqx_steps.ConfigDict`][] (SCICO's keys) or a
            [`eqx_steps.TrainConfig`][].
        - `model`: the initialised Equinox model; it takes one example.
        - `train_ds`: a dict of arrays with equal leading length, with the
            input (`config["input_key"]`, default `"image"`) and the target
            (`config["target_key"]`, default `"label"`); an entry may be a PyTree
            of arrays (a tuple of a model's several inputs). Or an iterable of
            such dicts, each one batch (this process's share of it, of any
            size that divides over the local devices): a user's own loader. A
            re-iterable one (a list, a loader object) starts a new pass when it
            ends; one without a length needs `config["num_steps"]`; a resumed run
            reads on from where the iterable is (it does not skip batches).
            Or a Grain `MapDataset`, `IterDataset` or `DataLoader` of global
            batches of `config["batch_size"]` (or, sharded by process, of each
            process's share): its state is stored in each checkpoint and a
            resumed run reads on with the batches the uninterrupted run would
            have seen (see the "Data pipelines" page); one without a length
            needs `config["num_steps"]`.
        - `test_ds`: a dict as `train_ds` (or a Grain input of batches, read
            one pass per evaluation), or `None` (no evaluation: the records
            hold the train metrics only). Entries beyond the input and the
            target reach a custom `train_step_fn`/`eval_step_fn` in each batch;
            with the stock steps, which do not read them, a warning names them.
        - `model_state`, `key`, `trainable`, `forward`: as for
            [`eqx_steps.TrainState.create`][] (the model's `eqx.nn.State`; a PRNG
            key for dropout; the filter of the optimised leaves; how the model is
            applied to a batch: [`eqx_steps.per_example_args`][] for a tuple
            input `model(x, t)`). With the default `forward` (or `whole_batch`),
            an integer image input is cast to floating point as SCICO casts it;
            other integer inputs (token ids) and every input of another
            `forward` keep their dtype.
        - `tx`: a ready optax optimizer. Then `config["opt_type"]`, `"momentum"`
            and `"create_train_state"` are not used, and the `learning_rate`
            metric is read from `tx`'s state when it was built with
            `optax.inject_hyperparams`; otherwise none is recorded (the config's
            `lr_schedule` is not what `tx` follows).
            Without `tx`, `config["create_train_state"]` builds the state, and
            `key`, `trainable` and `forward`, when given, re-create it from its
            model, model state and optimizer.
        - `fallback`: with `checkpointing`, when the latest checkpoint in
            `workdir` is corrupt, resume from the newest older one that is not
            (with a `CheckpointFallbackWarning`) instead of raising.

        With `checkpointing`, `workdir` is created and checked to be writable here,
        and the temporary folders of saves that were interrupted are removed.
        """
        self.config = cfg = TrainConfig.from_dict(config)
        keys = (cfg.input_key, cfg.target_key)
        check_model(model)
        self.input = TrainInput(train_ds, cfg)
        first = self.input.first
        if self.input.data is not None:
            train_ds = self.input.data
        if is_grain(test_ds):
            from .pipeline._common import renamed

            test_ds = renamed(test_ds, lambda b: as_step_batch("test_ds", b, keys))
        elif test_ds is not None:
            check_dataset("test_ds", test_ds, keys)
            test_ds = as_step_batch("test_ds", test_ds, keys)
        n = jax.device_count()
        grain = self.input.grain
        default = grain.batch_size if grain is not None else None
        self.batch_size = check_divisible(
            "config['batch_size']", cfg.batch_size or default or 2 * n, n, "devices"
        )
        self.data_key, _ = jax.random.split(jax.random.key(cfg.seed))
        self.train_ds, self.test_ds = train_ds, test_ds
        # One input example's shape: a tuple for an array input, the same PyTree
        # of tuples for a model of several inputs.
        self.ishape = jax.tree_util.tree_map(
            lambda x: tuple(np.shape(x)[1:]), first["image"]
        )
        # Inputs in the model's floating dtype (integer images are cast, as SCICO's
        # iterator casts them; float64 under x64 stays float64 for such a model).
        floats = {
            jax.numpy.dtype(x.dtype)
            for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
        }
        self.dtype = floats.pop() if len(floats) == 1 else jax.numpy.dtype("float32")
        # SCICO's cast of integer images applies where the input is an image by
        # the default convention: one array, handed to the model as it is.
        self.image_key = "image" if forward in (per_example, whole_batch) else None
        warn_unscaled_images(first["image"], self.image_key is not None)
        warn_unused_entries(cfg, first, None if is_grain(test_ds) else test_ds)
        self.eval_dt_iter = (
            None
            if test_ds is None
            else create_input_iter(
                self.data_key,
                test_ds,
                self.batch_size,
                train=False,
                dtype=self.dtype,
                name="test_ds",
                image_key=self.image_key,
            )
        )
        self.steps_per_epoch = self.input.configure(
            self.data_key, self.batch_size, self.dtype, self.image_key
        )
        self.num_steps = cfg.num_steps or self.steps_per_epoch * cfg.num_epochs
        self.steps_per_eval = cfg.steps_per_eval
        self.log_every_steps = cfg.log_every_steps or self.steps_per_epoch * 20
        self.steps_per_checkpoint = (
            cfg.steps_per_checkpoint or self.steps_per_epoch * 10
        )
        self.workdir = os.path.abspath(cfg.workdir)
        self.is_main = jax.process_index() == 0

        config = {**cfg.to_dict(), "steps_per_epoch": self.steps_per_epoch}
        if cfg.num_steps is not None:  # the schedules count the run in epochs
            config["num_epochs"] = max(-(-cfg.num_steps // self.steps_per_epoch), 1)
        self.lr_schedule = as_schedule(
            cfg.lr_schedule(config), "the result of config['lr_schedule']"
        )
        self.state = initial_state(
            cfg,
            config,
            model,
            self.lr_schedule,
            tx=tx,
            fallback=fallback,
            model_state=model_state,
            key=key,
            trainable=trainable,
            forward=forward,
        )
        self.train_dt_iter = self.input.start(int(self.state.step))
        # With a ready optimizer, the recorded learning rate is the one its state
        # holds (`optax.inject_hyperparams`), and none otherwise: never the
        # config's schedule, which that optimizer does not follow.
        self._train_fns = train_fns(cfg, None if tx is not None else self.lr_schedule)
        self.eval_fn = parallel_eval_step(
            cfg.criterion,
            cfg.metrics_fn,
            eval_step_fn=cfg.eval_step_fn,
            backend=cfg.backend,
        )
        self.history = History()
        self._hooks: list[Hook] = []

    @property
    def p_train_step(self) -> Callable[[TrainState, Any], tuple[TrainState, Any]]:
        """SCICO's `p_train_step`: the compiled parallel training step `train()`
        calls, one step per call, `(state, batch) -> (new_state, metrics)`, on a
        batch of `train_dt_iter` (see [`eqx_steps.parallel_train_step`][]). It
        donates `state` (the trainer owns its states): use the returned state,
        never the one passed in, afterwards."""
        return self._train_fns[1]

    @property
    def p_eval_step(self) -> Callable[[TrainState, Any], Any]:
        """SCICO's `p_eval_step`: the compiled parallel evaluation step,
        `(state, batch) -> metrics` per device, on a batch of `eval_dt_iter` (see
        [`eqx_steps.parallel_eval_step`][])."""
        return self.eval_fn

    def input_state(self, step: int) -> dict[str, Any] | None:
        """The input's state saved with the checkpoint of `step`: for a Grain
        `train_ds`, its iterator's state from which the batch of `step` follows
        (JSON; see [`eqx_steps.load_data_state`][]); `None` for a dict of arrays
        or an iterable, whose batches follow from the step alone or are not
        tracked. In a multi-process run whose pipeline yields per-process
        batches, every process must call it at the same step (it gathers their
        states).
        """
        return self.input.checkpoint_state(step)

    def log(self, text: str) -> None:
        """Print `text` when `config.log` is set (process 0 only)."""
        if self.config.log and self.is_main:
            print(text, flush=True)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Metrics over the test set by SCICO's definition, or `steps_per_eval` batches.

        **Arguments:**

        - `state`: the state to evaluate.

        **Returns:**

        The metrics of each per-device batch, averaged over devices and batches
        (the last, smaller batch weighted by its size): see
        [`eqx_steps.evaluate_dataset`][].
        """
        cfg = self.config
        if self.test_ds is None:
            return {}
        return evaluate_dataset(
            self.eval_fn,
            state,
            self.test_ds,
            self.batch_size,
            max_batches=self.steps_per_eval,
            criterion=cfg.criterion,
            metrics_fn=cfg.metrics_fn,
            eval_step_fn=cfg.eval_step_fn,
            image_key=self.image_key,
        )

    def add_hook(
        self, fn: Callable[[StepInfo], Any] | None = None, *, every: int = 1
    ) -> Any:
        """Call `fn(info)` during `train()` every `every` steps and at the end.

        `fn` runs after each call of the training step that reaches (or, with
        `steps_per_call > 1`, passes) a multiple of `every` steps, and after the
        last call; it gets a [`eqx_steps.StepInfo`][]. Hooks run in the order
        added, after the built-in ones (the record of the History at log points,
        checkpoints, `metrics.jsonl`, the progress bar), so at a log point
        `trainer.history.records[-1]` is the record of `info.step`.

        **Arguments:**

        - `fn`: the hook; leave it out to use `add_hook(every=N)` as a decorator.
        - `every`: its period in steps (default 1: after every call).

        **Returns:**

        `fn` (or, without `fn`, a decorator that adds its function).
        """
        every = check_int("every", every)

        def add(fn: Callable[[StepInfo], Any]) -> Callable[[StepInfo], Any]:
            if not callable(fn):
                raise TypeError(f"`fn` must be a function of a StepInfo, got {fn!r}.")
            self._hooks.append(Hook(fn, every))
            return fn

        return add if fn is None else add(fn)

    def train(self) -> tuple[Any, History]:
        """Run the training loop.

        Trains for `num_epochs` epochs from the initial (or restored) state. After
        each call of the training step the hooks run at their points: every
        `log_every_steps` steps and at the end, a record of the train and eval
        metrics is added to the returned `History` (with `log=True` it is also
        appended to `workdir/metrics.jsonl` and printed under a progress bar);
        with `checkpointing=True` a checkpoint is saved every
        `steps_per_checkpoint` steps and at the end; then the hooks of
        [`eqx_steps.BasicTrainer.add_hook`][].

        With `steps_per_call = K > 1` each call runs `K` steps on `K` batches
        stacked by the input iterator, except where fewer than `K` steps remain
        before a log point, a checkpoint or the end: those run one per call, from
        a single-batch iterator at the same step. So any `log_every_steps` and
        `steps_per_checkpoint` work; multiples of `K` avoid the single steps.

        On SIGINT (Ctrl-C) or SIGTERM (in the main thread; the previous handlers
        are restored when `train()` returns) the loop finishes the call in
        flight, saves a checkpoint of its step (with `checkpointing`; in a
        multi-process job every process stops at the same step) and raises
        [`eqx_steps.TrainingInterrupted`][]. A second signal raises at once,
        leaving the previous checkpoint intact. Resuming gives the same final
        state as an uninterrupted run.

        **Returns:**

        A 2-tuple of the final `TrainState` (with `config["return_state"] =
        False`: the pair `(model, model_state)`, as SCICO returns the variables)
        and the `History`.
        """
        with StopRequests(jax.process_count() > 1) as stop:
            return run(self, stop)

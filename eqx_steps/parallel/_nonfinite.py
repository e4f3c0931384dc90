"""The non-finite policy: what a step that produced NaN or infinity does.

A transformation of the per-device training step (the wrappers that map it over
the devices know nothing about it) and a check on the host after the call. This
is the one loss-aware layer of the parallel steps: it reads `metrics["loss"]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, PyTree

from .._validate import check_choice
from ..state import TrainState
from ..steps import Batch, Metrics


NanPolicy = Literal["raise", "skip", "ignore"]
Step = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


class NonFiniteStepError(FloatingPointError):
    """A training step produced a non-finite loss or parameters.

    Raised by a step of [`eqx_steps.parallel_train_step`][] with
    `nan_policy="raise"`. The update was not applied: `state` is the state to
    continue from (the one before the step, with its step counter advanced).

    **Attributes:**

    - `state`: the [`eqx_steps.TrainState`][] to continue from.
    """

    state: TrainState

    def __init__(self, message: str, state: TrainState):
        super().__init__(message)
        self.state = state


def _all_finite(tree: PyTree) -> Bool[Array, ""]:
    """Whether every inexact leaf of `tree` is finite, as one reduction.

    `x * 0` is 0 where `x` is finite and NaN where it is not, so the sum of every
    leaf's `x * 0`, raveled and concatenated, is NaN exactly when a leaf has a
    NaN or an infinity (never an overflow: the terms are zeros). One reduction
    over one concatenation: the flag is the output of one fusion. Written as
    `jnp.all` over per-leaf `jnp.all(jnp.isfinite(x))`, XLA turned the flags
    into a chain of scalar `and`s and copied that chain into every fused select
    of the new state, which doubled the step's compile time; per-leaf sums, one
    small fusion per leaf, still added ~20% to a small model's compile
    (docs/performance.md).
    """
    flat = [
        jnp.ravel(jnp.abs(x * 0) if jnp.iscomplexobj(x) else x * 0).astype(jnp.float32)
        for x in jax.tree_util.tree_leaves(tree)
        if eqx.is_inexact_array(x)
    ]
    if not flat:
        return jnp.array(True)
    return jnp.isfinite(jnp.sum(jnp.concatenate(flat)))


class NonFinitePolicy:
    """`"raise"`, `"skip"` or `"ignore"` a step with a non-finite result.

    Non-finite means a NaN or infinity in the new model's or model state's
    floating leaves, or in `metrics["loss"]` when there is one. Other metrics are
    not checked: an SNR or PSNR is `+inf` for a perfect fit.
    """

    def __init__(self, policy: NanPolicy):
        self.policy = check_choice("nan_policy", policy, ("raise", "skip", "ignore"))

    def keeps_on_host(self, *, donate: bool, steps_per_call: int) -> bool:
        """Whether the state to continue from after a non-finite step can be the
        one passed in, kept on the host side, rather than selected on the
        devices: for `"raise"` with one step per call and no donation (the
        default step). Its program then only computes the flag: the per-leaf
        selects of the whole state made the compile ~1.3x longer."""
        return self.policy == "raise" and not donate and steps_per_call == 1

    def guard(self, step: Step, *, select: bool = True) -> Step:
        """The per-device `step`, keeping the old state (all but the step counter)
        when the new one is not finite, and adding `metrics["nonfinite"]` (1.0 or
        0.0); `step` itself for `"ignore"`. With `select=False` (see
        [`NonFinitePolicy.keeps_on_host`][]) the new state is returned as it is,
        only the flag is added."""
        if self.policy == "ignore":
            return step

        def guarded(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
            new, metrics = step(state, batch)
            metrics = dict(metrics)
            finite = _all_finite((metrics.get("loss"), new.model, new.model_state))
            if not select:
                metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
                return new, metrics
            kept = state.replace(step=new.step)
            new = jax.tree_util.tree_map(
                lambda n, o: (
                    n if n is o or not eqx.is_array(n) else jnp.where(finite, n, o)
                ),
                new,
                kept,
            )
            metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
            return new, metrics

        return guarded

    def check(
        self, state: TrainState, metrics: Metrics, before: TrainState | None = None
    ) -> None:
        """On the host, after a call: raise [`NonFiniteStepError`][] for
        `"raise"` if a step of the call was not finite (reads one flag back).
        `before`: the state passed to the call, when its program did not select
        the state to continue from (`guard(..., select=False)`)."""
        if self.policy != "raise":
            return
        bad = np.atleast_1d(np.asarray(metrics["nonfinite"]))
        if bad.any():
            if before is not None:  # the update is dropped here, on the host
                state = before.replace(step=state.step)
            i = int(np.argmax(bad))
            first = int(np.asarray(state.step)) - len(bad) + i
            loss: Any = np.atleast_1d(np.asarray(metrics.get("loss", np.nan)))[i]
            raise NonFiniteStepError(
                f"non-finite loss or parameters at step {first} (loss = {loss}); the "
                "update was not applied and the state to continue from is in this "
                "error's `state` attribute. Lower the learning rate, check the data, "
                "or pass nan_policy='skip' to drop such updates and continue.",
                state,
            )

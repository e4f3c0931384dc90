"""The callable a parallel step builder returns: checks, cache, placement, call.

One call, on its hot path (the state is the one this step returned last): check
the batch's layout, place the batch, call the compiled function on the arrays
remembered from last time, throttle (CPU), rebuild the state, apply the
non-finite check. Any other state takes the slow path first: boundary checks,
split, compile-cache lookup, placement of the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from ..platform import compiler_options
from ..state import TrainState
from ..steps import Batch
from ._flat import CompileCache, split, Static
from ._mesh import Placement
from ._nonfinite import NonFinitePolicy
from ._scan import repeat, Unroll
from ._strategies import PmapStrategy, ShardedStrategy
from ._throttle import throttle_for


def _check_state(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(
            f"`state` must be an eqx_steps.TrainState, got {type(state).__name__}; "
            "build one with `TrainState.create(model, tx)`."
        )
    shape = getattr(state.step, "shape", ())
    if len(shape) != 0:
        raise ValueError(
            f"`state` has a leading device axis (its `step` has shape {shape}), as "
            "`eqx_steps.replicate` makes for a hand-written pmap; the parallel steps "
            "take the unreplicated state and place it themselves: pass the state "
            "before `replicate`, or `eqx_steps.unreplicate(state)`."
        )


def _check_not_donated(arrays: list[Any]) -> None:
    if any(isinstance(x, jax.Array) and x.is_deleted() for x in arrays):
        raise ValueError(
            "`state`'s buffers were donated to a previous call (donate=True), which "
            "consumed them; pass the state that call returned, or build the step "
            "with donate=False to keep earlier states usable."
        )


def _on_leaves(step: Callable, static: Static, returns_state: bool) -> Callable:
    """`step` as a function of the state's arrays (`static` closed over)."""
    if not returns_state:
        return lambda arrays, batch: step(static.build(arrays), batch)

    def flat_step(arrays, batch):
        new_state, metrics = step(static.build(arrays), batch)
        new_arrays, new_static = split(new_state)
        if new_static != static:
            raise ValueError(
                "the training step returned a state of another structure than it "
                "was given (a post-processor or a custom step changed the model's "
                "structure or a static field); return a state of the same structure."
            )
        return new_arrays, metrics

    return flat_step


class ParallelStep:
    """A per-device step run on every device, as `step(state, batch)`.

    Built by [`eqx_steps.parallel_train_step`][] (returns `(state, metrics)`) and
    [`eqx_steps.parallel_eval_step`][] (returns `metrics`). `step.lower(state,
    batch)` shows the program a call runs; `step.cache_size` counts the programs
    compiled (one per state structure and static leaves); `step.compiler_options`
    the XLA options they compile with.
    """

    def __init__(
        self,
        per_device: Callable,
        *,
        returns_state: bool,
        strategy: PmapStrategy | ShardedStrategy,
        donate: bool,
        steps_per_call: int,
        unroll: Unroll,
        policy: NonFinitePolicy,
        compiler_options: dict[str, Any] | None,
        view: Callable[[TrainState], TrainState] | None = None,
    ):
        self._view = view
        # "raise" without donation keeps the state passed in for the error, so
        # the program need not select it (a smaller, quicker compile).
        self._keep_before = returns_state and policy.keeps_on_host(
            donate=donate, steps_per_call=steps_per_call
        )
        self._per_device = (
            policy.guard(per_device, select=not self._keep_before)
            if returns_state
            else per_device
        )
        self._returns_state = returns_state
        self._strategy = strategy
        self._donate = donate
        self._steps_per_call = steps_per_call
        self._unroll: Unroll = unroll
        self._policy = policy
        self._check = policy.check if policy.policy == "raise" else None
        self._compiler_options = compiler_options
        self._placement = Placement(strategy.mesh, steps_per_call)
        self._cache = CompileCache(self._compile)
        self._after_call = throttle_for(
            strategy.devices[0].platform,
            strategy.mesh.devices.size * jax.process_count(),
        )
        # The state returned (or evaluated) last, with its arrays, static part and
        # compiled function: the hot path of a training or evaluation loop.
        self._last_state: Any = None
        self._last: tuple[list[Any], Static, Callable] | None = None

    @property
    def cache_size(self) -> int:
        """How many programs this step has compiled."""
        return len(self._cache)

    @property
    def compiler_options(self) -> dict[str, Any] | None:
        """The XLA options this step compiles with: the `compiler_options` it was
        built with, plus on CPU the fast XLA:CPU setting of
        [`eqx_steps.platform.compiler_options`][] (read when a program is compiled)."""
        return compiler_options(
            self._strategy.devices[0].platform, self._compiler_options
        )

    def _compile(self, static: Static) -> Callable:
        body = repeat(
            _on_leaves(self._per_device, static, self._returns_state),
            self._steps_per_call,
            self._unroll,
            platform=self._strategy.devices[0].platform,
            axis_size=len(self._strategy.devices),
        )
        return jax.jit(
            self._strategy.map(body, self._placement.device_axis, static),
            in_shardings=self._placement.in_shardings,
            donate_argnums=(0,) if self._donate else (),
            compiler_options=self.compiler_options,
        )

    def _prepare(self, state: Any, *, copy: bool) -> tuple[list[Any], Static, Callable]:
        _check_state(state)
        if self._view is not None:  # only what the step reads is placed
            state = self._view(state)
        arrays, static = split(state)
        _check_not_donated(arrays)
        fn = self._cache.get(static)
        arrays = self._placement.state(arrays, copy=copy)
        return self._strategy.place_state(arrays, static), static, fn

    def __call__(self, state: TrainState, batch: Batch) -> Any:
        # The hot path: kept to one pass over the batch's leaves, the compiled
        # call (which places a NumPy batch itself) and the state's rebuild.
        batch = self._placement.prepare(batch)
        if state is self._last_state and self._last is not None:
            arrays, static, fn = self._last
        else:
            arrays, static, fn = self._prepare(state, copy=self._donate)
        out = fn(arrays, batch)
        if not self._returns_state:  # an evaluation loop passes the same state
            self._after_call(out)
            self._last_state, self._last = state, (arrays, static, fn)
            return out
        new_arrays, metrics = out
        self._after_call(metrics)  # never the state: the next call may donate it
        new_state = static.build(new_arrays)
        self._last_state, self._last = new_state, (new_arrays, static, fn)
        if self._check is not None:
            self._check(new_state, metrics, state if self._keep_before else None)
        return new_state, metrics

    def lower(self, state: TrainState, batch: Batch) -> jax.stages.Lowered:
        """The program `self(state, batch)` runs, lowered (nothing is run).

        **Arguments:**

        - `state`, `batch`: as for a call.

        **Returns:**

        A `jax.stages.Lowered`: `.as_text()` is its StableHLO,
        `.compile().as_text()` the optimised HLO, `.compile().memory_analysis()`
        XLA's memory figures.
        """
        batch = self._placement.prepare(batch)
        arrays, _, fn = self._prepare(state, copy=False)
        return fn.lower(arrays, batch)  # pyright: ignore

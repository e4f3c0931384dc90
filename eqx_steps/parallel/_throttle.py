"""A bound on the calls in flight: an XLA:CPU workaround.

XLA:CPU's in-process collectives deadlock when several dozen multi-device
executions are queued at once (seen with 4 host devices on 2 cores: fine at 32,
stuck at 64; XLA aborts after its 40 s rendezvous timeout). On CPU, each call of
a parallel step over several devices therefore waits for the oldest result once
more than `MAX_IN_FLIGHT` such calls of this process are queued; this costs
nothing measurable. A step on one device has no collective to deadlock and is
not throttled, nor are other platforms.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax


MAX_IN_FLIGHT = 8
_in_flight: collections.deque = collections.deque()


def _throttle(out: Any) -> None:
    # All outputs of one execution are ready together: one array stands for the
    # call, and waiting on it is one C++ call (no PyTree walk per step).
    leaf = next(x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array))
    _in_flight.append(leaf)
    while len(_in_flight) > MAX_IN_FLIGHT:
        _in_flight.popleft().block_until_ready()


def _no_throttle(out: Any) -> None:
    pass


def throttle_for(platform: str, devices: int) -> Callable[[Any], None]:
    """What a call on `platform` does with its result, for a job of `devices`
    devices in all: queue it, waiting for the oldest beyond `MAX_IN_FLIGHT`, on
    CPU with more than one device; nothing otherwise."""
    return _throttle if platform == "cpu" and devices > 1 else _no_throttle

"""A bound on the calls in flight: an XLA:CPU workaround.

XLA:CPU's in-process collectives deadlock when several dozen multi-device
executions are queued at once (seen with 4 host devices on 2 cores: fine at 32,
stuck at 64; XLA aborts after its 40 s rendezvous timeout). On CPU, each parallel
call therefore waits for the oldest result once more than `MAX_IN_FLIGHT` calls
of any parallel step of this process are queued; this costs nothing measurable.
Other platforms are not throttled.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax


MAX_IN_FLIGHT = 8
_in_flight: collections.deque = collections.deque()


def _throttle(out: Any) -> None:
    _in_flight.append(out)
    while len(_in_flight) > MAX_IN_FLIGHT:
        jax.block_until_ready(_in_flight.popleft())


def _no_throttle(out: Any) -> None:
    pass


def throttle_for(platform: str) -> Callable[[Any], None]:
    """What a call on `platform` does with its result: queue it, waiting for the
    oldest beyond `MAX_IN_FLIGHT` on CPU; nothing elsewhere."""
    return _throttle if platform == "cpu" else _no_throttle

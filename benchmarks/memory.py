"""Peak memory of the host process (XLA:CPU has no `memory_stats`).

`PeakRSS` reads Linux's high-water mark of the resident set (`VmHWM`), reset
with `/proc/self/clear_refs`, so that a measurement covers one case only; where
that is not possible it falls back to `resource.getrusage(...).ru_maxrss`, the
peak of the whole process so far.
"""

from __future__ import annotations

import ctypes
import resource


# XLA_FLAGS entry of the `library-split` memory case: XLA:CPU's all-reduce
# combiner off, one all-reduce per gradient leaf.
NO_COMBINER = "--xla_disable_hlo_passes=cpu-all-reduce-combiner"


def trim() -> None:
    """Hand the heap's free pages back to the system (glibc), so that the RSS is
    the memory in use rather than what the allocator kept from earlier work
    (tracing, compiling). A no-op where `malloc_trim` does not exist."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """The resident set size now, in MB (0 where unknown)."""
    kb = _status_kb("VmRSS")
    return (kb or 0) / 1024


def max_rss_mb() -> float:
    """The peak resident set size since the last reset (or process start), MB."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    return kb / 1024


class PeakRSS:
    """The increase of the peak RSS over the RSS at `reset()`."""

    def __init__(self):
        self.start = rss_mb()

    def reset(self) -> tuple[float, float]:
        """Start a new measurement; returns the peak so far and the RSS now."""
        before = max_rss_mb()
        trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.start = rss_mb()
        return before, self.start

    def max_mb(self) -> float:
        """The peak RSS since `reset()` (or since the process started)."""
        return max_rss_mb()

    def increase_mb(self) -> float:
        return max(0.0, max_rss_mb() - self.start)

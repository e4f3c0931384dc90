"""How the command reports a mistake: one line on stderr and exit status 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UsageError(Exception):
    """A bad option, file or folder: reported on one line, exit status 2."""


def one_line(error: BaseException | str) -> str:
    """The text of `error` on one line (its class name when it has no text)."""
    text = error if isinstance(error, str) else str(error)
    return " ".join(text.split()) or type(error).__name__


@contextlib.contextmanager
def reported(prefix: str = "") -> Iterator[None]:
    """Turn the library's validation errors into a `UsageError` (one line).

    `ValueError`, `TypeError` and `OSError` (a missing or unreadable file) are
    what the library raises for a bad input; anything else is a bug and keeps
    its traceback.
    """
    try:
        yield
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(prefix + one_line(e)) from None

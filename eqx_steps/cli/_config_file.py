"""Config files of the command: `--config FILE` in TOML or JSON.

Read and validated like the options, against the same settings table
(`_settings.py`): an unknown key is refused with the closest valid one.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Callable
from typing import Any

from ._errors import one_line, UsageError
from ._settings import BY_NAME


def _key(key: Any, where: str) -> str:
    name = str(key).replace("-", "_")
    if name not in BY_NAME:
        close = difflib.get_close_matches(name, list(BY_NAME), n=1)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else "valid keys are " + ", ".join(BY_NAME)
        )
        raise UsageError(f"{where}: unknown key {str(key)!r}; {hint}")
    return name


def _parse_text(text: str, path: str) -> Any:
    """The JSON or TOML document in `text` (the file ending picks the first try)."""
    parsers: list[tuple[str, Callable[[str], Any]]] = [
        ("JSON", json.loads),
        ("TOML", tomllib.loads),
    ]
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".toml":
        parsers.reverse()
    elif suffix == ".json":
        parsers = parsers[:1]
    errors = []
    for name, load in parsers:
        try:
            return load(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            errors.append(f"not valid {name} ({one_line(e)})")
    raise UsageError(f"config file {path!r} is " + " and ".join(errors))


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a TOML or JSON file, validated like the options.

    **Arguments:**

    - `path`: the file (`.toml`, `.json`, or either).

    **Returns:**

    The settings it holds, by key.

    **Raises:**

    `UsageError` naming the file and the problem (unreadable, not TOML/JSON, an
    unknown key with the closest valid one, a value of the wrong type).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(
            f"cannot read config file {path!r}: {e.strerror or e}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"config file {path!r} is not UTF-8 text") from None
    config = _parse_text(text, path)
    if not isinstance(config, dict):
        raise UsageError(
            f"config file {path!r} must hold a table of settings such as "
            f'{{"model": "dncnn", "epochs": 3}}, got {type(config).__name__}'
        )
    out = {}
    for key, value in config.items():
        name = _key(key, f"config file {path!r}")
        out[name] = BY_NAME[name].check(value, f"{name!r} in {path!r}")
    return out

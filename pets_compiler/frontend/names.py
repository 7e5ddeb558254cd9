"""Task names become directory names inside an artifact: only a safe, portable set is accepted."""

from __future__ import annotations

import re

from pets_compiler.errors import TaskNameError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_task_name(name: object) -> str:
    """Return the name if it is a safe task name, else raise TaskNameError (before any file is touched)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TaskNameError(
            f"invalid task name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or "
            "digit (no '/', no leading '.', no whitespace)"
        )
    return name

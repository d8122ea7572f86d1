"""How every command ends on a user error: one line on stderr, no traceback, exit status 2.

A user error is one the user fixes by changing a flag, a config value, a record or a file
(``vlm_sweep.errors.UserError``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

USER_ERROR_EXIT = 2


def is_cli_user_error(err: BaseException) -> bool:
    """Whether ``err`` is printed as one line (every ``UserError``)."""
    from vlm_sweep.errors import is_user_error

    return is_user_error(err)


def first_line(err: BaseException) -> str:
    """The error's message in one line (for an error re-raised from a DataLoader worker: the original one)."""
    text = str(err)
    if not text:
        return type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        original = lines[-1]
        prefix = f"{type(err).__name__}: "
        return original.split(prefix, 1)[1] if prefix in original else original
    return lines[0]


def user_error_line(err: BaseException) -> str:
    """``config error: ...`` as is, anything else as ``error: ...``."""
    message = first_line(err)
    return message if message.startswith(("config error:", "error:")) else f"error: {message}"


def run_command(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run a command's ``main``; a user error prints its one line and returns exit status 2."""
    try:
        return main(argv)
    except Exception as err:
        if not is_cli_user_error(err):
            raise
        print(user_error_line(err), file=sys.stderr)
        return USER_ERROR_EXIT

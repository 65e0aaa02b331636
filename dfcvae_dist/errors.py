"""One error type for everything a user can fix, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable


class UserError(Exception):
    """Bad input, bad config or a bad file: the message names the culprit and is all the user needs."""


def message(err: BaseException) -> str:
    """The message itself, also when a DataLoader worker wrapped it in "Caught ... Original Traceback":
    then it is the traceback's last line without its `module.ExceptionClass: ` prefix."""
    text = str(err)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+: ", "", last)
    return text


def one_line(err: BaseException, limit: int | None = None) -> str:
    """A library's exception in one line: the first line of its `message` (its class name when it has none),
    at most `limit` characters."""
    lines = message(err).splitlines()
    text = lines[0] if lines else type(err).__name__
    return text[:limit] if limit is not None else text


def cli_main(main: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
    """Run `main(argv)`; a UserError becomes one line on stderr and exit 2 (a traceback only with --debug).
    Messages of libraries that say nothing to our user are filtered (`quiet.py`)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        if debug:
            argv.remove("--debug")
        from dfcvae_dist.quiet import quiet_library_messages

        quiet_library_messages()
        try:
            return main(argv) or 0
        except UserError as err:
            if debug:
                raise
            print(f"error: {message(err)}", file=sys.stderr)
            return 2

    return wrapper

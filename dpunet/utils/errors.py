"""User-facing errors and the wrapper every console script runs under."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class DpunetError(Exception):
    """An error caused by the user's input or request; printed without a traceback."""


def warn(message: str) -> None:
    """A one-line `dpunet warning:` on stderr: something the user should know that does not stop the command."""
    print(f"dpunet warning: {message}", file=sys.stderr)


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Run a console-script main; DpunetError ends with a one-line message and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            code = main(*args, **kwargs)
        except DpunetError as e:
            print(f"dpunet error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return wrapper

"""diffaccel's one error hierarchy: every expected failure carries the exit code the command line maps it to.

====================  ====  ===========================================================================
class                 exit  raised for
====================  ====  ===========================================================================
``DiffaccelError``    1     an expected failure that is neither of the two below (a dead rank, a timeout)
``InputError``        2     bad input: an invalid option value, an unknown name, an unreadable image
``WeightsError``      3     missing, damaged or non-finite model weights (the message names the fix)
====================  ====  ===========================================================================

`InputError` is also a `ValueError` and `WeightsError` a `RuntimeError`, so callers that catch the builtin types
keep working. `run_command` is the one place that turns these into a one-line message and an exit code; a plain
`ValueError` is still read as bad input (exit 2) for code that does not raise `InputError` yet.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable


class DiffaccelError(Exception):
    """An expected failure with a one-line message; `exit_code` is what the command line exits with."""

    exit_code: int = 1

    def __init__(self, message: str = "", *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = int(exit_code)


class InputError(DiffaccelError, ValueError):
    """Bad input (exit code 2): the message names the option, value or file and what would be valid."""

    exit_code = 2


class WeightsError(DiffaccelError, RuntimeError):
    """Missing or damaged model weights (exit code 3): the message names the file and the command that fixes it."""

    exit_code = 3


#: exit code for an error that is not a `DiffaccelError`: a defect, reported with its type
UNEXPECTED_EXIT_CODE = 1
INTERRUPTED_EXIT_CODE = 130


def run_command(fn: Callable[[], int | None], *, debug: bool = False) -> int:
    """Call `fn` and turn its outcome into an exit code, printing one `error: ...` line on stderr on failure.

    `debug` prints the full traceback as well. Unexpected exceptions (defects) exit 1 with their type named.
    """
    try:
        return int(fn() or 0)
    except DiffaccelError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except ValueError as exc:  # bad input from code not yet raising InputError (library code should): exit 2
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return InputError.exit_code
    except Exception as exc:  # a defect: say so in one line, the traceback is one flag away
        if debug:
            traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: {exc}"
              + ("" if debug else " (rerun with --debug for the traceback; please report it)"), file=sys.stderr)
        return UNEXPECTED_EXIT_CODE

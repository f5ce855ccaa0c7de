"""Writing results to stdout, telling a failure to write them from a command's own I/O.

The CLI reports "cannot write to stdout" (and what was done before) for
:class:`StdoutError`; a reader that went away stays ``BrokenPipeError`` (exit 141). The
demo and the quick bench print through :func:`print_out` too, so a full disk under their
output is reported once, not as a failed step.
"""

from __future__ import annotations

import sys
from typing import IO, Any, Optional

__all__ = ["STDOUT", "StdoutError", "flush_stdout", "print_out"]

#: ``file`` of :func:`print_out` meaning ``sys.stdout`` as it is at the call (``None``
#: is a closed stream, never "the default").
STDOUT: Any = object()


class StdoutError(Exception):
    """Writing the results to stdout failed (not a reader that went away: that is
    ``BrokenPipeError``); the text is the OS error's."""


def print_out(text: str, file: Optional[IO[str]] = STDOUT, flush: bool = False, end: str = "\n") -> None:
    """``print(text, file=file)`` (default :data:`STDOUT`); a failure to write stdout
    raises :class:`StdoutError`. A closed stream (``None``: ``sys.stdout`` or
    ``sys.stderr`` of a process started without it) takes nothing: text meant for a
    closed stderr never lands on stdout, which may carry a protocol."""
    stream = sys.stdout if file is STDOUT else file
    if stream is None:
        return
    try:
        print(text, file=stream, flush=flush, end=end)
    except BrokenPipeError:
        raise
    except OSError as exc:
        if stream is not sys.stdout:
            raise
        raise StdoutError(exc.strerror or str(exc)) from None


def flush_stdout() -> None:
    """Flush stdout now (not at exit, where a failure would be lost)."""
    if sys.stdout is None:  # started with stdout closed (>&-): nothing was written to fail
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise StdoutError(exc.strerror or str(exc)) from None

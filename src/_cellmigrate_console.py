"""The ``cellmigrate`` console script's entry point.

Importing the package (numpy, the kernels) takes a few hundred milliseconds before the
command line's own signal handling is in place; a Ctrl-C then printed Python's
``KeyboardInterrupt`` traceback. This module lives outside the package so that it runs
before that import: until the import is done, SIGINT ends the process with one line and
exit status 130, as the command line does afterwards. Nothing has been opened or
written by then. (A Ctrl-C in the interpreter's own start, before this module runs, is
still Python's: that is some 20 ms on an idle machine.)
"""

from __future__ import annotations

import os
import sys

# Nothing slow before the handler is in: ``signal`` imports enum, functools and
# collections, ``typing`` imports re (some 25 ms together, far more on a loaded machine),
# and a Ctrl-C in them printed a traceback. ``_signal`` is built in; ``signal`` re-exports
# the same functions and handler object, and types them for the checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from types import FrameType
else:
    import _signal

__all__ = ["main"]

#: What ``cli.main`` says of a Ctrl-C before a command runs.
_INTERRUPTED = "cellmigrate: error: interrupted\n"


def _interrupted_while_importing(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write(_INTERRUPTED)
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> int:
    """Run ``cellmigrate.cli.main`` with SIGINT handled quietly while it is imported
    (``cli.main`` handles it from its first line on). A SIGINT that is ignored (a
    background job of a non-interactive shell) or handled otherwise is left as it is."""
    previous = _signal.getsignal(_signal.SIGINT)
    quiet = previous is _signal.default_int_handler
    if quiet:
        _signal.signal(_signal.SIGINT, _interrupted_while_importing)
    from cellmigrate.cli import main as cli_main

    try:
        if quiet:
            _signal.signal(_signal.SIGINT, previous)
        return cli_main()
    except KeyboardInterrupt:  # between the two lines above
        sys.stderr.write(_INTERRUPTED)
        return 128 + int(_signal.SIGINT)

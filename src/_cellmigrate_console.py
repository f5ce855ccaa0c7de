"""The ``cellmigrate`` console script's entry point.

Importing the package (numpy, the kernels) takes a few hundred milliseconds before the
command line's own signal handling is in place; a Ctrl-C then printed Python's
``KeyboardInterrupt`` traceback. This module lives outside the package so that it runs
before that import: until the import is done, SIGINT ends the process with one line and
exit status 130, as the command line does afterwards. Nothing has been opened or
written by then.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Optional

__all__ = ["main"]

#: What ``cli.main`` says of a Ctrl-C before a command runs.
_INTERRUPTED = "cellmigrate: error: interrupted\n"


def _interrupted_while_importing(signum: int, frame: Optional[FrameType]) -> None:
    sys.stderr.write(_INTERRUPTED)
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> int:
    """Run ``cellmigrate.cli.main`` with SIGINT handled quietly while it is imported
    (``cli.main`` handles it from its first line on). A SIGINT that is ignored (a
    background job of a non-interactive shell) or handled otherwise is left as it is."""
    previous = signal.getsignal(signal.SIGINT)
    quiet = previous is signal.default_int_handler
    if quiet:
        signal.signal(signal.SIGINT, _interrupted_while_importing)
    from cellmigrate.cli import main as cli_main

    try:
        if quiet:
            signal.signal(signal.SIGINT, previous)
        return cli_main()
    except KeyboardInterrupt:  # between the two lines above
        sys.stderr.write(_INTERRUPTED)
        return 128 + signal.SIGINT

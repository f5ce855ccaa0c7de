"""``python -m cellmigrate``: the same command line as the ``cellmigrate`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

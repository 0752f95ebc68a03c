"""`python -m sparse_ops <command>`: the same command line as `sparse-ops` (sparse_ops.app.cli)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())

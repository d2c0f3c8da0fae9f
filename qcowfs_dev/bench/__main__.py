"""python -m qcowfs_dev.bench: what scripts/bench runs."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))

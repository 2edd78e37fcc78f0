"""``python -m sm_utils ...``: the same command line as ``sm`` (see sm_utils.cli)."""

import sys

from .cli import main

sys.exit(main())

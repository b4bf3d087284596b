"""``python -m scriptpool``: the command line."""

import sys

from scriptpool.cli import main

sys.exit(main())
